"""``publish_data``: what code running on an engine calls to send data to the client.

The call returns without waiting for the client (non-blocking sends). By default it copies
what it sends, so the caller may change its arrays at once; outstanding sends are bounded, and
past the bound the call waits for the oldest send (the producer slows down, nothing is dropped).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from threading import get_ident
from typing import Any

from ..errors import MpipubError, PublishError
from ..transport import comm as _comm
from ..transport.comm import CLIENT_RANK
from . import loop as _engine
from .batch import KeyNotStr, ValueNotSendable, fastpub


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

    Returns at once: numpy arrays are copied (so the caller may change them right away) and
    travel as raw bytes, several calls coalesced into one MPI message when they come fast
    (``mpipub.engine.sender``); other values are pickled. The client sees the latest value of every
    key in ``AsyncResult.data`` and every publication in ``AsyncResult.stream()``.
    With ``copy=False`` arrays of 4 MiB and more are sent from their own memory: the caller
    promises not to modify them until the task function returns (faster for large arrays,
    wrong if the promise is broken); smaller ones are copied anyway, which measured faster.
    """
    eng = _engine.current_engine()
    if eng is not None and get_ident() != eng.task_thread:
        # a thread of the task's own: published whole before the task's end is decided
        # (run_task marks the threads it leaves running under this lock)
        with eng.thread_lock:
            eng.check_publishing_thread()  # (a thread that outlived its task is refused)
            _checked_add(eng, data, copy)
        return
    _checked_add(eng, data, copy)


def _checked_add(eng, data, copy: bool) -> None:
    """Check ``data`` (a task runs, a mapping, the sink accepts it) and hand it to
    ``Engine.publish``, naming the key that is wrong."""
    if eng is None or eng.sender.task_id is None:
        raise _not_in_task_error()
    if type(data) is not dict:
        if not isinstance(data, Mapping):
            raise PublishError(f"publish_data() takes a dict of name -> value, got "
                               f"{type(data).__name__} ({_where(eng)})")
        data = dict(data)
    checker = eng.sender.check_value
    if checker is not None:
        for key, value in data.items():
            if not isinstance(key, str):
                raise _key_error(key, eng)
            problem = checker(key, value)
            if problem:
                raise PublishError(f"publish_data() cannot store key {key!r}: {problem} "
                                   f"({_where(eng)})")
    try:
        eng.publish(data, copy)  # (keys are checked there, in the one pass over the data)
    except KeyNotStr as e:
        raise _key_error(e.key, eng) from None
    except ValueNotSendable as e:
        raise PublishError(
            f"publish_data() cannot send key {e.key!r}: value of type "
            f"{type(data[e.key]).__name__} cannot be pickled ({e.exc}) ({_where(eng)})"
        ) from e.exc


if fastpub is not None:
    # the C path first (through current_engine()'s sender, _fastpub.set_current), this
    # function for everything it does not take; it looks and pickles like this function
    publish_data = functools.update_wrapper(fastpub.Publisher(publish_data), publish_data)


def _key_error(key, eng) -> PublishError:
    return PublishError(f"publish_data() keys must be str, got {key!r} "
                        f"of type {type(key).__name__} ({_where(eng)})")


def _where(eng) -> str:
    return f"engine {eng.rank}, task {eng.sender.task_id}, step {eng.sender.step}"


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
