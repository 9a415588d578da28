"""The client on rank 0: ``Client``, its views, and the runtime that holds them together.

``Client()`` is called on every rank by a script started with ``mpiexec -n N python script.py``:
on rank 0 it returns the client; on an engine rank it serves tasks until the client closes and
then ends the process (status 0), so the same script runs unchanged on every rank.
"""

from __future__ import annotations

import atexit
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Callable

from . import comm as _comm
from . import engine as _engine
from . import wire
from .asyncresult import AsyncMapResult, AsyncResult, TaskRecord, decode_batch
from .comm import CLIENT_RANK, TAG_ABORT, TAG_CBUF, TAG_CTRL
from .errors import MpipubError
from .iothread import IOThread

#: How long ``close()`` waits for engines to stop before it aborts the MPI job.
CLOSE_TIMEOUT_S = float(os.environ.get("MPIPUB_CLOSE_TIMEOUT_S", "10"))

_runtime: _Runtime | None = None
_runtime_lock = threading.Lock()


def _describe(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


class _Runtime:
    """Rank 0's single runtime: the I/O thread, task records and the engines' state."""

    def __init__(self, world: _comm.World, history_bytes: int):
        self.world = world
        self.ids = list(range(1, world.size))
        self.hosts = world.hosts
        self.history_bytes = history_bytes
        self.records: dict[int, TaskRecord] = {}
        self.task_ids = itertools.count(1)
        self.lock = threading.Lock()
        self.byes: set[int] = set()
        self.bye_event = threading.Event()
        self.closed = False
        self.sinks: list = []
        self.failed_sinks: list = []
        #: The Jupyter kernel that owns the engines until it shuts down (mpipub.notebook):
        #: while set, Client.close() leaves the engines running.
        self.owner: object | None = None
        #: Told of every submitted task and its forwarded output (the kernel shows it live).
        self.observer = None
        self.io = IOThread(world, self._route, self._fatal, quiet=self._quiet)
        self.io.start()

    def _quiet(self) -> bool:
        """No task outstanding: the I/O thread may sleep until the next post (iothread.py)."""
        return not self.records and not self.closed

    # -- messages from engines (I/O thread) -----------------------------------------------------
    def _route(self, m: wire.Message) -> None:
        if m.kind == wire.BYE:
            self.byes.add(m.source)
            if len(self.byes) == len(self.ids):
                self.bye_event.set()
            return
        rec = self.records.get(m.task_id)
        if rec is None:
            sys.stderr.write(f"mpipub: message of kind {m.kind} from engine {m.source} for "
                             f"unknown task {m.task_id} ignored\n")
            return
        if m.kind == wire.DATA:
            pubs = None
            if self.sinks:  # they keep every publication: decode it here, once for all
                pubs = decode_batch(m.source, m.task_id, m.step, m.body, m.buffers,
                                    rec.reported)
                for s in self.sinks:
                    s.on_publications(rec, m.source, pubs)
            rec.on_batch(m.source, m, pubs)
        elif m.kind == wire.RESULT:
            try:
                ok, value, t0, t1 = m.decode()
            except Exception as exc:  # noqa: BLE001
                ok, value, t0, t1 = False, (type(exc).__name__, "the task's result could not be "
                                            f"unpickled on the client: {exc}", ""), m.time, m.time
            rec.on_result(m.source, ok, value, t0, t1)
            if rec.pending == 0:
                for s in self.sinks:
                    s.on_task_end(rec)
                with self.lock:
                    self.records.pop(m.task_id, None)
        elif m.kind == wire.OUTPUT:
            text = m.decode()
            rec.on_output(m.source, m.step, text)
            if self.observer is not None:
                self.observer.on_output(rec, m.source, m.step, text)

    def _fatal(self, exc: BaseException) -> None:
        for rec in list(self.records.values()):
            rec.fail_all(exc)

    # -- submitting -----------------------------------------------------------------------------
    def check_open(self) -> None:
        if self.closed:
            raise MpipubError("this mpipub client is closed and its engines have stopped; "
                              "a job has one client (start a new MPI job for more work)")
        if self.io.error is not None:
            raise MpipubError(f"the client's I/O thread failed: {self.io.error!r}")

    def submit(self, targets: list[int], payloads: list[tuple], label: str, single: bool,
               result_cls=AsyncResult) -> AsyncResult:
        """Send one task (``(fn, args, kwargs)`` per target) and return its AsyncResult.

        Serialisation happens here, in the user's thread, so an unpicklable function or
        argument fails at submit time with the culprit named."""
        self.check_open()
        options: dict = {"main_file": _main_file()}
        for s in self.sinks:
            options.update(s.task_options())
        task_id = next(self.task_ids)
        cache: dict[int, wire.Encoded] = {}
        encs = []
        for p in payloads:
            if id(p) not in cache:
                cache[id(p)] = _encode_task(task_id, p, label, options)
            encs.append(cache[id(p)])
        rec = TaskRecord(task_id, targets, self.hosts, label, self.history_bytes)
        if self.observer is not None:
            self.observer.on_submit(rec)
        for s in self.sinks:
            s.on_task_start(rec, payloads[0])
        with self.lock:
            self.records[task_id] = rec
        for target, enc in zip(targets, encs):
            self.io.post(enc, target, TAG_CTRL, TAG_CBUF)
        return result_cls(self, rec, single)

    def abort(self, task_id: int, engines: Iterable[int], reason: str | None = None) -> None:
        """Ask ``engines`` to stop ``task_id``; ``reason`` ends up in their TaskAborted."""
        enc = wire.encode(wire.ABORT, task_id, 0, reason)
        for e in engines:
            self.io.post(enc, e, TAG_ABORT, TAG_CBUF)

    # -- closing --------------------------------------------------------------------------------
    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop every engine and the I/O thread. Running tasks are aborted first; an engine
        that does not stop within ``timeout`` (a task that never publishes) ends the job with
        MPI_Abort, so a job never hangs at exit."""
        if self.closed:
            return
        self.closed = True
        running = [r for r in list(self.records.values()) if r.pending]
        for rec in running:
            busy = [e for e in rec.engines if not rec.state[e].done]
            sys.stderr.write(f"mpipub: closing while task {rec.task_id} ({rec.label}) still "
                             f"runs on engines {busy}; aborting it\n")
            self.abort(rec.task_id, busy, "because the client closed (its script ended)")
        stop = wire.encode(wire.STOP, 0, 0, None)
        for e in self.ids:
            self.io.post(stop, e, TAG_CTRL, TAG_CBUF)
        deadline = time.monotonic() + timeout
        while not self.bye_event.is_set() and self.io.error is None:
            if time.monotonic() > deadline:
                missing = sorted(set(self.ids) - self.byes)
                self._abort_job(f"engines {missing} did not stop within {timeout} s (a task "
                                "that never calls publish_data cannot be aborted)")
            self.bye_event.wait(0.05)
        if not self.bye_event.is_set():
            # The I/O thread died, so engines' byes (and their pending sends) can no longer be
            # received: MPI_Finalize would wait for them forever. End the job instead.
            missing = sorted(set(self.ids) - self.byes)
            self._abort_job(f"the client's I/O thread failed ({self.io.error!r}) before "
                            f"engines {missing} stopped")
        self.io.stop()
        self.io.join(timeout=5)
        self._close_sinks()

    def _abort_job(self, why: str) -> None:
        """End the whole job with MPI_Abort, after saying why and closing the sinks."""
        sys.stdout.flush()
        sys.stderr.write(f"mpipub: {why}; aborting the MPI job\n")
        sys.stderr.flush()
        self._close_sinks()
        time.sleep(0.2)  # let mpiexec forward the line before it tears the job down
        self.world.MPI.COMM_WORLD.Abort(1)

    def _close_sinks(self) -> None:
        for s in self.sinks:
            try:
                s.close()
            except Exception as exc:  # noqa: BLE001
                self.failed_sinks.append(s)
                sys.stderr.write(f"mpipub: closing sink {s!r} failed: {exc!r}\n")
        self.sinks = []


def _main_file() -> str | None:
    """The client's script, for engines to name in tracebacks (None in a notebook)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return os.path.abspath(path) if isinstance(path, str) else None


def _culprit(fn, args, kwargs) -> str:
    """Name the first part of a task that cannot be serialised."""
    def fails(obj) -> Exception | None:
        try:
            _engine._cloudpickle().dumps(obj, protocol=5, buffer_callback=lambda b: None)
        except Exception as exc:  # noqa: BLE001
            return exc
        return None

    if (e := fails(fn)) is not None:
        return f"the function {_describe(fn)} cannot be serialised: {e}"
    for i, a in enumerate(args):
        if (e := fails(a)) is not None:
            return f"argument {i} ({type(a).__name__}) cannot be serialised: {e}"
    for k, v in kwargs.items():
        if (e := fails(v)) is not None:
            return f"keyword argument {k!r} ({type(v).__name__}) cannot be serialised: {e}"
    return "the task cannot be serialised"


def _encode_task(task_id: int, payload: tuple, label: str, options: dict) -> wire.Encoded:
    fn, args, kwargs = payload
    try:
        dumps = _engine._cloudpickle().dumps  # (imported on first submit: start-up stays light)
        return wire.encode(wire.TASK, task_id, 0, (fn, args, kwargs, options), dumps)
    except Exception as exc:  # noqa: BLE001
        raise TypeError(f"cannot send {label} to the engines: {_culprit(fn, args, kwargs)}") \
            from exc


#: Default ``Client(history_bytes=...)``: what each task keeps for ``AsyncResult.stream()``.
#: Kept modest on purpose: rank 0's memory is often shared with engines, and memory that is
#: released gets reused for the next receives (a run that kept everything received into
#: fresh pages measured 2.2-3.3 GB/s at 64 KiB-1 MiB, against 5-5.7 GB/s with 64 MiB).
#: The HDF5 sink is the place that keeps every step.
HISTORY_BYTES = 64 << 20


class Client:
    """The client of an mpipub job (rank 0). On engine ranks, serves until the client closes,
    then exits the process with status 0.

    ``sink``: path of an HDF5 file that keeps every publication (see docs/sink.md);
    ``sink_options``: its options. ``history_bytes``: how much published data each task keeps
    for ``AsyncResult.stream()`` (64 MiB; older publications are dropped with a warning).
    """

    def __init__(self, sink: str | os.PathLike | None = None, *, history_bytes: int = HISTORY_BYTES,
                 **sink_options: Any):
        world = _comm.world()
        if world.rank != CLIENT_RANK:
            _engine.serve_and_exit(world)
        global _runtime
        with _runtime_lock:
            if _runtime is None:
                _runtime = _Runtime(world, history_bytes)
                atexit.register(_close_at_exit)
                _exit_cleanly_on_sigterm()
            elif _runtime.closed:
                _runtime.check_open()
        self._rt = _runtime
        self._sink = None
        if sink is not None:
            from .sink import Sink

            snk = Sink(sink, world, **sink_options)
            snk.runtime = self._rt  # so a failing sink can tell the engines (abort)
            self._rt.sinks.append(snk)
            self._sink = snk
        elif sink_options:
            raise TypeError(f"sink options {sorted(sink_options)} given without sink=PATH")

    @property
    def ids(self) -> list[int]:
        """Engine ids: their MPI ranks, 1..N-1."""
        return list(self._rt.ids)

    def __len__(self) -> int:
        return len(self._rt.ids)

    def __getitem__(self, key) -> DirectView:
        return DirectView(self._rt, _targets(key, self._rt.ids))

    def __repr__(self) -> str:
        more = "..." if len(self) > 8 else ""
        return f"<mpipub.Client: {len(self)} engines {self.ids[:8]}{more}>"

    @property
    def hosts(self) -> dict[int, str]:
        """Host name of every engine."""
        return {e: self._rt.hosts[e] for e in self._rt.ids}

    def close(self) -> None:
        """Stop the engines (aborting running tasks) and the client's I/O thread. In an mpipub
        Jupyter kernel the kernel owns the engines until it shuts down: this closes only the
        sink this client opened."""
        if self._rt.owner is not None:
            if self._sink is not None and self._sink in self._rt.sinks:
                self._rt.sinks.remove(self._sink)
                self._sink.close()
            return
        self._rt.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _close_at_exit(exit_code: int | None = None) -> None:
    """Stop the engines and close sinks at the end of the script (``exit_code``: the
    script's status when the caller knows it)."""
    rt = _runtime
    if rt is not None and not rt.closed:
        rt.close()
    if isinstance(getattr(sys, "last_value", None), KeyboardInterrupt):
        # Python would now kill itself with SIGINT, which mpiexec reports as a crash of the
        # whole job (and tears the engines down mid-exit). Finish MPI and exit 130 instead.
        _exit_now(130)
    if rt is not None and rt.failed_sinks:
        # HDF5 crashes when it tears down a file whose writes failed: skip its teardown.
        # Data was lost, so the job's status is non-zero.
        code = exit_code or 1
        sys.stderr.write(f"mpipub: exiting with status {code} because the sink failed "
                         "(see above); what it flushed before stays readable\n")
        _exit_now(code)


#: After MPI_Finalize, how long rank 0 waits before a fast non-zero exit (seconds).
EXIT_GRACE_S = 0.3


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    _comm.finalize()
    if code != 0 and _runtime is not None:
        # MPI_Finalize returns on every rank together, but the engines still tear their
        # interpreters down. mpiexec SIGKILLs every process still alive when one exits
        # non-zero, and then reports status 9 instead of ours: let them finish first.
        time.sleep(EXIT_GRACE_S)
    os._exit(code)


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (scancel, time limits, mpiexec forwarding it) becomes SystemExit(143) on rank 0,
    so the engines are stopped and a sink is flushed and closed before the job ends."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)




def _targets(key, ids: list[int]) -> list[int] | int:
    size = len(ids) + 1
    if isinstance(key, slice):
        return [r for r in range(size)[key] if r != CLIENT_RANK]
    if isinstance(key, (list, tuple, range)):
        out = [_targets(k, ids) for k in key]
        return out  # type: ignore[return-value]
    if not isinstance(key, int) or isinstance(key, bool):
        raise TypeError(f"engines are selected by id (int), slice or list, not {key!r}")
    if key == CLIENT_RANK:
        raise IndexError("rank 0 is the client, not an engine; engine ids are "
                         f"{ids[0]}..{ids[-1]}")
    if key not in ids:
        raise IndexError(f"no engine {key}: engine ids are {ids[0]}..{ids[-1]} "
                         f"(this job has {size} ranks)")
    return key


class DirectView:
    """Some engines, addressed together: ``c[:]``, ``c[1]``, ``c[1:3]``, ``c[[1, 3]]``."""

    def __init__(self, runtime: _Runtime, targets: list[int] | int):
        self._rt = runtime
        self._single = isinstance(targets, int)
        self.targets: list[int] = [targets] if self._single else list(targets)  # type: ignore
        if not self.targets:
            raise IndexError("this view selects no engines")
        self.block = False

    def __repr__(self) -> str:
        return f"<DirectView {self.targets[0] if self._single else self.targets}>"

    def __len__(self) -> int:
        return len(self.targets)

    # -- apply ----------------------------------------------------------------------------------
    def _apply(self, fn, args, kwargs, label=None) -> AsyncResult:
        if not callable(fn):
            raise TypeError(f"apply() needs a callable, got {type(fn).__name__}")
        label = label or f"{_describe(fn)}()"
        p = (fn, args, kwargs)
        return self._rt.submit(self.targets, [p] * len(self.targets), label, self._single)

    def apply_async(self, f: Callable, *args: Any, **kwargs: Any) -> AsyncResult:
        """Run ``f(*args, **kwargs)`` on every engine of the view; return at once."""
        return self._apply(f, args, kwargs)

    def apply_sync(self, f: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run ``f(*args, **kwargs)`` on every engine and wait for the results."""
        return self._apply(f, args, kwargs).get()

    def apply(self, f: Callable, *args: Any, **kwargs: Any) -> Any:
        """``apply_sync`` if ``self.block`` else ``apply_async``."""
        ar = self._apply(f, args, kwargs)
        return ar.get() if self.block else ar

    # -- map ------------------------------------------------------------------------------------
    def map_async(self, f: Callable, *sequences: Sequence) -> AsyncMapResult:
        """Split the sequences across the view's engines in contiguous chunks; ``get()``
        returns ``[f(*xs) for xs in zip(*sequences)]`` in input order."""
        if not sequences:
            raise TypeError("map() needs at least one sequence")
        items = list(zip(*sequences))
        n = len(self.targets)
        chunks = [items[i * len(items) // n:(i + 1) * len(items) // n] for i in range(n)]
        targets = [t for t, c in zip(self.targets, chunks) if c] or self.targets[:1]
        chunks = [c for c in chunks if c] or [[]]
        payloads = [(_engine.run_map, (f, c), {}) for c in chunks]
        return self._rt.submit(targets, payloads, f"map({_describe(f)})", False, AsyncMapResult)

    def map_sync(self, f: Callable, *sequences: Sequence) -> list:
        return self.map_async(f, *sequences).get()

    def map(self, f: Callable, *sequences: Sequence):
        ar = self.map_async(f, *sequences)
        return ar.get() if self.block else ar

    # -- namespace ------------------------------------------------------------------------------
    def execute(self, code: str, block: bool | None = None):
        """Run Python source in each engine's namespace."""
        ar = self._apply(_engine.run_execute, (code,), {}, label="execute()")
        return ar.get() if (self.block if block is None else block) else ar

    def push(self, ns: dict, block: bool | None = None):
        """Set names in each engine's namespace."""
        if not isinstance(ns, dict):
            raise TypeError(f"push() takes a dict of name -> value, got {type(ns).__name__}")
        ar = self._apply(_engine.run_push, (ns,), {}, label="push()")
        return ar.get() if (self.block if block is None else block) else ar

    def pull(self, names: str | Sequence[str], block: bool | None = None):
        """Read names from each engine's namespace."""
        ar = self._apply(_engine.run_pull, (names,), {}, label="pull()")
        return ar.get() if (self.block if block is None else block) else ar

    def __getitem__(self, name: str):
        return self.pull(name, block=True)

    def __setitem__(self, name: str, value) -> None:
        self.push({name: value}, block=True)

