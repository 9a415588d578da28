"""``publish_data``: what code running on an engine calls to send data to the client.

The call returns without waiting for the client (non-blocking sends). By default it copies
what it sends, so the caller may change its arrays at once; outstanding sends are bounded, and
past the bound the call waits for the oldest send (the producer slows down, nothing is dropped).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

from . import comm as _comm
from . import engine as _engine
from . import wire
from .comm import CLIENT_RANK
from .errors import MpipubError, PublishError


def _mpi_rank_if_running() -> int | None:
    """This process's COMM_WORLD rank if mpi4py has already initialised MPI, else None
    (never initialises MPI itself)."""
    import sys

    MPI = sys.modules.get("mpi4py.MPI")
    try:
        if MPI is not None and MPI.Is_initialized() and not MPI.Is_finalized():
            return MPI.COMM_WORLD.Get_rank()
    except Exception:  # noqa: BLE001
        pass
    return None


def _not_in_task_error() -> MpipubError:
    w = _comm._world
    if w is not None and w.rank == CLIENT_RANK:
        where = "on rank 0, which is the client"
    elif w is not None:
        where = f"on engine {w.rank} outside a task"
    elif (rank := _mpi_rank_if_running()) == CLIENT_RANK:
        where = "on rank 0, which is the client (before Client() was created)"
    elif rank is not None:
        where = (f"on MPI rank {rank} before Client() made it an engine (outside a task); "
                 "engine ranks run user code only inside tasks")
    else:
        where = "outside an mpipub engine (no MPI job with a client in this process)"
    return MpipubError(
        f"publish_data() was called {where}. It only works inside a function that the client "
        "sent to an engine, e.g. `Client()[:].apply_async(simulation_loop)` where "
        "simulation_loop calls publish_data."
    )


def publish_data(data: Mapping[str, Any], *, copy: bool = True) -> None:
    """Publish ``data`` (a dict of str -> value) from the running task to the client.

    Numpy arrays (and other buffer-protocol objects) travel as raw buffers; other values are
    pickled. The client sees the latest value of every key in ``AsyncResult.data`` and every
    publication in ``AsyncResult.stream()``. With ``copy=False`` the arrays are sent from their
    own memory: the caller promises not to modify them until later calls return (it is faster
    for large arrays, and wrong if the promise is broken).
    """
    eng = _engine.current_engine()
    if eng is None or eng.task_id is None:
        raise _not_in_task_error()
    where = f"engine {eng.rank}, task {eng.task_id}, step {eng.step}"
    if not isinstance(data, Mapping):
        raise PublishError(
            f"publish_data() takes a dict of name -> value, got {type(data).__name__} ({where})"
        )
    for key in data:
        if not isinstance(key, str):
            raise PublishError(f"publish_data() keys must be str, got {key!r} "
                               f"of type {type(key).__name__} ({where})")
    data = dict(data)
    checker = eng.task_options.get("check_value")
    if checker is not None:
        for key, value in data.items():
            problem = checker(key, value)
            if problem:
                raise PublishError(f"publish_data() cannot store key {key!r}: {problem} ({where})")
    eng.poll_aborts()
    try:
        enc = eng.encode(wire.DATA, eng.step, data, pickle.dumps, copy)
    except Exception as exc:  # noqa: BLE001 - find which key could not be pickled
        raise _pickle_error(data, exc, where) from exc
    eng.step += 1
    eng.post(enc)  # a Ctrl-C / SIGTERM is raised only after the sends are posted


def _pickle_error(data: dict, exc: Exception, where: str) -> PublishError:
    for key, value in data.items():
        try:
            pickle.dumps(value, protocol=5, buffer_callback=lambda b: None)
        except Exception as e:  # noqa: BLE001
            return PublishError(f"publish_data() cannot send key {key!r}: value of type "
                                f"{type(value).__name__} cannot be pickled ({e}) ({where})")
    return PublishError(f"publish_data() could not serialise the data: {exc} ({where})")


def engine_comm():
    """Inside a task: an MPI communicator holding the engines only (rank 0 excluded).

    Use it for your own collectives and halo exchanges among engines; its ranks are the
    engine ids minus one.
    """
    eng = _engine.current_engine()
    if eng is None:
        raise MpipubError("engine_comm() only works on an engine (inside a task sent by the "
                          "client); rank 0 is the client and is not part of it")
    return eng.world.engines
