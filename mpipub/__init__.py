"""mpipub: watch and keep what an MPI simulation publishes, while it runs.

Rank 0 of an MPI job is the client (your script or notebook); every other rank is an engine
that runs the functions the client sends. Code on an engine calls ``publish_data(dict)``; the
client sees the latest data of each engine in ``AsyncResult.data``.
"""

__version__ = "0.1.0"

# The public names, listed once: name -> the module that defines it, loaded on first use (an
# engine rank never imports the client side, and a job that never reads a sink file never
# imports h5py: import time is most of an empty job's start-up when several ranks share a
# small node). ``__all__`` is every name here but ``open``; the TYPE_CHECKING block below
# repeats them for type checkers and IDEs only, and tests/test_api.py checks it says the same.
_WHERE = {
    "AsyncMapResult": "client.asyncresult", "AsyncResult": "client.asyncresult",
    "EngineStats": "client.asyncresult", "Publication": "client.asyncresult",
    "Client": "client.client", "DirectView": "client.client",
    "engine_comm": "engine.datapub", "publish_data": "engine.datapub",
    "Reference": "engine.namespace", "open": "sink.reader", "Run": "sink.reader",
    "CompositeError": "errors", "ConfigError": "errors", "LaunchError": "errors",
    "MpipubError": "errors", "PublishError": "errors", "RemoteError": "errors",
    "TaskAborted": "errors", "TaskNotSendable": "errors", "SinkError": "errors",
    "SinkFileError": "errors",
}


def __getattr__(name: str):
    if name == "plot":  # the submodule mpipub.plot (live plots), on first use
        import importlib

        return importlib.import_module(f"{__name__}.plot")
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'mpipub' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def load_ipython_extension(ip) -> None:
    """``%load_ext mpipub``: ``%px`` / ``%%px`` and readable remote errors (mpipub.notebook)."""
    from .notebook.magics import load

    load(ip)


def __dir__():
    return sorted(list(globals()) + list(_WHERE) + ["plot"])


TYPE_CHECKING = False  # (no typing import at start-up)
if TYPE_CHECKING:  # for type checkers and IDEs: the names of _WHERE (tests/test_api.py checks)
    # ("X as X": an explicit re-export; __all__ below is computed, which they do not follow)
    from .client.asyncresult import AsyncMapResult as AsyncMapResult
    from .client.asyncresult import AsyncResult as AsyncResult
    from .client.asyncresult import EngineStats as EngineStats
    from .client.asyncresult import Publication as Publication
    from .client.client import Client as Client
    from .client.client import DirectView as DirectView
    from .engine.datapub import engine_comm as engine_comm
    from .engine.datapub import publish_data as publish_data
    from .engine.namespace import Reference as Reference
    from .errors import CompositeError as CompositeError
    from .errors import ConfigError as ConfigError
    from .errors import LaunchError as LaunchError
    from .errors import MpipubError as MpipubError
    from .errors import PublishError as PublishError
    from .errors import RemoteError as RemoteError
    from .errors import SinkError as SinkError
    from .errors import SinkFileError as SinkFileError
    from .errors import TaskAborted as TaskAborted
    from .errors import TaskNotSendable as TaskNotSendable
    from .sink.reader import Run as Run
    from .sink.reader import open as open  # (mpipub.open; not in __all__)

# Every public name but ``open`` (it would shadow the builtin in ``from mpipub import *``;
# ``mpipub.open`` stays).
__all__ = [name for name in _WHERE if name != "open"]
