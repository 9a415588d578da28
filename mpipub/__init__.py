"""mpipub: watch and keep what an MPI simulation publishes, while it runs.

Rank 0 of an MPI job is the client (your script or notebook); every other rank is an engine
that runs the functions the client sends. Code on an engine calls ``publish_data(dict)``; the
client sees the latest data of each engine in ``AsyncResult.data``.
"""

__version__ = "0.1.0"

# Public names, loaded on first use: an engine rank never imports the client side, and a job
# that never reads a sink file never imports h5py (import time is most of an empty job's
# start-up when several ranks share a small node).
_WHERE = {
    "AsyncMapResult": "asyncresult", "AsyncResult": "asyncresult", "EngineStats": "asyncresult",
    "Publication": "asyncresult", "Client": "client", "DirectView": "client",
    "engine_comm": "datapub", "publish_data": "datapub", "CompositeError": "errors",
    "LaunchError": "errors", "MpipubError": "errors", "PublishError": "errors",
    "RemoteError": "errors", "TaskAborted": "errors", "open": "reader", "Run": "reader",
    "SinkFileError": "reader",
}


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'mpipub' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_WHERE))


TYPE_CHECKING = False  # (no typing import at start-up)
if TYPE_CHECKING:  # for type checkers and IDEs
    from .asyncresult import AsyncMapResult, AsyncResult, EngineStats, Publication
    from .client import Client, DirectView
    from .datapub import engine_comm, publish_data
    from .errors import (
        CompositeError,
        LaunchError,
        MpipubError,
        PublishError,
        RemoteError,
        TaskAborted,
    )
    from .reader import Run, SinkFileError, open

__all__ = [
    "AsyncMapResult",
    "AsyncResult",
    "Client",
    "CompositeError",
    "DirectView",
    "EngineStats",
    "LaunchError",
    "MpipubError",
    "Publication",
    "PublishError",
    "RemoteError",
    "Run",
    "SinkFileError",
    "TaskAborted",
    "engine_comm",
    "open",
    "publish_data",
]
