"""How rank 0 ends: one shutdown, run once, in an order mpipub owns, however the script ends.

The client's shutdown (abort running tasks, stop the engines, write and close the sink) runs
from ``threading``'s exit hook, which Python calls when the main thread is done and *before*
any ``atexit`` handler. An ``atexit`` handler would run after those of libraries imported later
(h5py's, registered at its first import inside ``Client(sink=...)``, unregisters its type
converters: a sink closed after it could not write its last task, and broke its file).

Signals that end a job: SIGTERM (``scancel``, ``kill``, mpiexec forwarding it) and SIGUSR1
(SLURM's ``--signal=USR1@LEAD`` warning before a time limit) become ``SystemExit(128 + signum)``
in the main thread, so the user's code unwinds and the shutdown runs: running tasks are
aborted, their tasks marked cut short in the sink, and rank 0 says so in one line. A signal
that arrives while the shutdown already runs is noted, never raised into it; once it is done,
rank 0 ignores them until it has ended (``comm.ignore_ending_signals``).
"""

from __future__ import annotations

import atexit
import signal
import sys
import threading
import time
from typing import Callable

#: The signals that cut a job short on rank 0, and how rank 0 names them.
CUT_SIGNALS = {
    signal.SIGTERM: "SIGTERM (scancel, a time limit or kill)",
    signal.SIGUSR1: "SIGUSR1 (SLURM's warning before the time limit)",
    signal.SIGINT: "Ctrl-C (SIGINT)",
}

_state: dict = {"shutting_down": False, "signal": None, "since": None, "raised": False}


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def cut_by() -> tuple[int | None, float | None]:
    """The first signal that reached rank 0 (or None) and when (time.time())."""
    return _state["signal"], _state["since"]


def shutting_down() -> bool:
    return _state["shutting_down"]


def begin_shutdown() -> bool:
    """Mark the shutdown as begun; False if it already had (it runs once). From now on a
    Ctrl-C is only noted too: raised, it would tear the sink's file mid-write."""
    if _state["shutting_down"]:
        return False
    _state["shutting_down"] = True
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)
    return True


def on_exit(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the main thread is done, before every ``atexit`` handler."""
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(fn)
            return
        except RuntimeError:  # the interpreter is already shutting down
            pass
    atexit.register(fn)  # (Pythons without the hook; runs before handlers registered earlier)


def _note(signum: int) -> bool:
    first = _state["signal"] is None
    if first:
        _state["signal"], _state["since"] = signum, time.time()
    return first


def _exiting(frame) -> bool:
    """Whether the main thread is already past the user's code, in the interpreter's exit
    (threading's shutdown, where our shutdown is about to run or runs): an exception raised
    there would skip it."""
    shutdown = getattr(threading, "_shutdown", None)
    code = getattr(shutdown, "__code__", None)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _say_still_closing(signum: int) -> None:
    sys.stderr.write(f"mpipub: {signal_name(signum)} again while closing; still closing "
                     "(SIGKILL ends the job at once, losing what is unwritten)\n")
    sys.stderr.flush()


def _on_sigint(signum, frame):
    """Python's own Ctrl-C (KeyboardInterrupt), with the time noted; never raised into the
    shutdown."""
    _note(signum)
    if _state["shutting_down"] or _exiting(frame):
        _say_still_closing(signum)
        return
    raise KeyboardInterrupt


def _on_signal(signum, frame):
    """SIGTERM / SIGUSR1: the first becomes SystemExit(128 + signum), which unwinds the
    user's code into the shutdown; later ones are only noted (raised again, one could land
    between the user's code and the shutdown, and skip it)."""
    _note(signum)
    if _state["raised"] or _state["shutting_down"] or _exiting(frame):
        _say_still_closing(signum)
        return
    _state["raised"] = True
    raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    """SIGTERM and SIGUSR1 end rank 0 through the shutdown, and Ctrl-C's time is noted
    (where nobody else handles them)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
