"""mpipub: watch and keep what an MPI simulation publishes, while it runs.

Rank 0 of an MPI job is the client (your script or notebook); every other rank is an engine
that runs the functions the client sends. Code on an engine calls ``publish_data(dict)``; the
client sees the latest data of each engine in ``AsyncResult.data``.
"""

from .asyncresult import AsyncMapResult, AsyncResult, EngineStats, Publication
from .client import Client, DirectView
from .datapub import engine_comm, publish_data
from .errors import CompositeError, LaunchError, MpipubError, PublishError, RemoteError, TaskAborted
from .reader import Run, open

__version__ = "0.1.0"

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
    "TaskAborted",
    "engine_comm",
    "open",
    "publish_data",
]
