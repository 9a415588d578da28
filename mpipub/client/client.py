"""The client on rank 0: ``Client``, its views, and the runtime that holds them together.

``Client()`` is called on every rank by a script started with ``mpiexec -n N python script.py``:
on rank 0 it returns the client; on an engine rank it serves tasks until the client closes and
then ends the process (status 0), so the same script runs unchanged on every rank.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import itertools
import linecache
import operator
import os
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Callable

from .. import config
from ..engine import loop as _engine
from ..engine import namespace as _ns
from ..engine.namespace import Reference, contains_reference
from ..errors import MpipubError, TaskNotSendable
from ..transport import comm as _comm
from ..transport import wire
from ..transport.comm import CLIENT_RANK, TAG_CBUF, TAG_CTRL
from . import ending
from .asyncresult import (
    AsyncGatherResult,
    AsyncMapResult,
    AsyncResult,
    TaskRecord,
    decode_batch,
    split_parts,
)
from .iothread import IOThread

#: How long ``close()`` waits for engines to stop before it aborts the MPI job.
CLOSE_TIMEOUT_S = config.get("MPIPUB_CLOSE_TIMEOUT_S")

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
        # tasks finished lately, in brief (never the records: they hold received buffers): a
        # signal that reached the engines too may end a task just before close() looks, and
        # it was cut short all the same
        self.finished: collections.deque = collections.deque(maxlen=64)
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
            if not self.closed:  # it left by itself (10 s after SIGTERM): its tasks end
                self._engine_left(m.source)
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
                self._task_ended(rec)
        elif m.kind == wire.OUTPUT:
            text = m.decode()
            rec.on_output(m.source, m.step, text)
            if self.observer is not None:
                self.observer.on_output(rec, m.source, m.step, text)

    def _task_ended(self, rec: TaskRecord) -> None:
        for s in self.sinks:
            s.on_task_end(rec)
        with self.lock:
            self.records.pop(rec.task_id, None)
        self.finished.append(_EndedTask(rec))

    def _engine_left(self, engine: int) -> None:
        """An engine said goodbye unasked: the tasks it had not finished fail, naming it."""
        now = time.time()
        for rec in list(self.records.values()):
            if engine in rec.state and not rec.state[engine].done:
                rec.on_result(engine, False, ("EngineLeft", f"engine {engine} left the job "
                                              f"before task {rec.task_id} ({rec.label}) ran "
                                              "there (its stderr says why)", ""), now, now)
                if rec.pending == 0:
                    self._task_ended(rec)

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
        if gone := sorted(set(targets) & self.byes):
            raise MpipubError(
                f"engine {', '.join(map(str, gone))} has left the job (its stderr says why: "
                "SIGTERM and no stop from the client for 10 s); a task for it cannot run: "
                "use a view of the others")
        options: dict = {"main_source": _main_source(payloads[0][0])}
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
        """Ask ``engines`` to stop ``task_id``; ``reason`` ends up in their TaskAborted.
        Sent on the tasks' tag, after the task itself (the I/O thread posts in order), so an
        engine sees the abort before it starts the task whenever it has arrived by then."""
        enc = wire.encode(wire.ABORT, task_id, 0, reason)
        for e in engines:
            self.io.post(enc, e, TAG_CTRL, TAG_CBUF)

    # -- closing --------------------------------------------------------------------------------
    def close(self, timeout: float = CLOSE_TIMEOUT_S, why: str | None = None,
              since: float | None = None) -> None:
        """Stop every engine and the I/O thread, then close the sinks. Running tasks are
        aborted first and marked cut short in the sinks (``why``: what ended the job; ``since``:
        when, so that tasks the same signal ended on the engines are marked too). An
        engine that does not stop within ``timeout`` (a task that never publishes) ends the
        job with MPI_Abort, so a job never hangs at exit; a sink still writing what the
        engines sent is waited for (with progress on stderr), never aborted."""
        if self.closed:
            return
        self.closed = True
        why = why or "the client closed (its script ended or called close())"
        running = [r for r in list(self.records.values()) if r.pending]
        cut = list(running)
        if since is not None:  # and those that a signal ended on the engines meanwhile
            cut[:0] = [t for t in list(self.finished) if t.by_signal and t.finished >= since - 5]
        for rec in cut:
            for s in self.sinks:
                s.on_task_cut_short(rec, why)
        for rec in running:
            busy = [e for e in rec.engines if not rec.state[e].done]
            sys.stderr.write(f"mpipub: closing while task {rec.task_id} ({rec.label}) still "
                             f"runs on engines {busy}; aborting it\n")
            self.abort(rec.task_id, busy, f"because {why}")
        stop = wire.encode(wire.STOP, 0, 0, None)
        for e in self.ids:
            if e not in self.byes:  # (one that left on its own is not listening)
                self.io.post(stop, e, TAG_CTRL, TAG_CBUF)
        self._wait_for_engines(timeout)
        self.io.stop()
        self.io.join(timeout=5)
        if cut:
            sys.stderr.write(f"mpipub: job cut short: {why}; " + "; ".join(
                f"task {r.task_id} ({r.label}) stopped with " + ", ".join(
                    f"engine {e} at {_step_text(s)}" for e, s in _last_steps(r).items())
                for r in cut)
                + "\n")
        self._close_sinks()

    def _wait_for_engines(self, timeout: float) -> None:
        """Wait for every engine's goodbye. The deadline moves while a sink makes progress:
        under back-pressure the goodbyes queue behind data the sink has yet to write."""
        deadline = time.monotonic() + timeout
        progress = self._sink_progress()
        said = 0.0
        while not self.bye_event.is_set() and self.io.error is None:
            now = time.monotonic()
            if now > deadline:
                p = self._sink_progress()
                if p != progress:
                    progress, deadline = p, now + timeout
                    if now - said > 2.0:
                        said = now
                        queued = sum(s.queued_bytes() for s in self.sinks)
                        sys.stderr.write(f"mpipub: waiting for the sink to write "
                                         f"{queued / 2**20:.0f} MiB before the engines can "
                                         "stop\n")
                else:
                    missing = sorted(set(self.ids) - self.byes)
                    self._abort_job(f"engines {missing} did not stop within {timeout} s (a "
                                    "task that never calls publish_data cannot be aborted)")
            self.bye_event.wait(0.05)
        if not self.bye_event.is_set():
            # The I/O thread died, so engines' byes (and their pending sends) can no longer be
            # received: MPI_Finalize would wait for them forever. End the job instead.
            missing = sorted(set(self.ids) - self.byes)
            self._abort_job(f"the client's I/O thread failed ({self.io.error!r}) before "
                            f"engines {missing} stopped")

    def _sink_progress(self) -> tuple:
        return tuple(s.written for s in self.sinks)

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


class _EndedTask:
    """What close() needs of a finished task: whether a signal ended it (an engine reported
    KeyboardInterrupt or TaskAborted('... got SIGTERM'), maybe before rank 0's own handler
    ran) and where each engine was."""

    __slots__ = ("task_id", "label", "finished", "by_signal", "steps")

    def __init__(self, rec: TaskRecord):
        self.task_id, self.label = rec.task_id, rec.label
        self.finished = rec.finished or time.time()
        self.steps = _last_steps(rec)
        self.by_signal = any(
            st.error is not None and (st.error.ename == "KeyboardInterrupt" or (
                st.error.ename == "TaskAborted" and " got SIG" in st.error.evalue))
            for st in rec.state.values())


def _last_steps(task) -> dict:
    """{engine: last step received} of a TaskRecord or an _EndedTask."""
    if isinstance(task, _EndedTask):
        return task.steps
    return {e: task.state[e].stats.last_step for e in task.engines}


def _step_text(step: int | None) -> str:
    return "no step published" if step is None else f"step {step}"


def _main_source(fn) -> tuple[str, list[str] | None] | None:
    """Where the task's ``__main__`` code comes from, so that remote tracebacks show its file
    and lines: the client's script (engines read it from the shared file system), or in a
    notebook the function's cell (its lines travel with the task)."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if isinstance(path, str):
        return os.path.abspath(path), None
    code = getattr(fn, "__code__", None)
    if code is not None and getattr(fn, "__module__", None) == "__main__":
        lines = linecache.getlines(code.co_filename)
        if lines:
            return code.co_filename, lines
    return None


def _culprit(fn, args, kwargs) -> str:
    """Name the first part of a task that cannot be serialised."""
    def fails(obj) -> Exception | None:
        try:
            wire.cloudpickle().dumps(obj, protocol=5, buffer_callback=lambda b: None)
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
        dumps = wire.cloudpickle().dumps  # (imported on first submit: start-up stays light)
        return wire.encode(wire.TASK, task_id, 0, (fn, args, kwargs, options), dumps)
    except Exception as exc:  # noqa: BLE001
        raise TaskNotSendable(f"cannot send {label} to the engines: "
                              f"{_culprit(fn, args, kwargs)}") \
            from exc


#: Default ``Client(history_bytes=...)``: what each task keeps for ``AsyncResult.stream()``.
#: Kept modest on purpose: rank 0's memory is often shared with engines, and memory that is
#: released gets reused for the next receives, which is faster than receiving into fresh
#: pages (docs/benchmarks.md, "Why the constants are what they are").
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
                ending.on_exit(_close_at_exit)
                ending.install_signal_handlers()
            elif _runtime.closed:
                _runtime.check_open()
        self._rt = _runtime
        self._sink = None
        if sink is not None:
            from ..sink.writer import Sink

            snk = Sink(sink, world, **sink_options)
            snk.runtime = self._rt  # so a failing sink can tell the engines (abort)
            snk.while_blocked = self._rt.io.service_outgoing
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
        """``c[2]`` one engine (its MPI rank), ``c[-1]`` the last, ``c[1:3]`` ranks 1-2,
        ``c[[1, 3]]`` a list, ``c[:]`` all. Slices select by rank; one that includes rank 0
        (the client), such as ``c[:2]``, is an IndexError, ``c[:]`` excepted."""
        return DirectView(self._rt, _targets(key, self._rt.ids))

    def direct_view(self, targets="all") -> DirectView:
        """A view of ``targets``: ``"all"`` (or None) for every engine, else as ``c[targets]``."""
        if targets is None or (isinstance(targets, str) and targets == "all"):
            return DirectView(self._rt, list(self._rt.ids))
        return DirectView(self._rt, _targets(targets, self._rt.ids))

    def wait(self, jobs=None, timeout: float | None = None) -> bool:
        """Wait for ``jobs`` (an AsyncResult or a list of them; default: every task still
        running) or ``timeout`` seconds; return whether all are done."""
        if jobs is not None:
            return _wait_all(_as_results(jobs), timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._rt.lock:
                running = [r for r in self._rt.records.values() if r.pending]
            if not running:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if not _wait_all([AsyncResult(self._rt, running[0], False)],
                             None if left is None else left):
                return False

    def use_cloudpickle(self) -> None:
        """A no-op, for ipyparallel scripts: mpipub always sends functions with cloudpickle."""

    def use_pickle(self) -> None:
        """A no-op, for ipyparallel scripts (see ``DirectView.use_pickle``)."""

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
    """The end of rank 0 (see mpipub.client.ending): stop the engines and close the sinks, once,
    however the script ended (``exit_code``: the script's status when the caller knows it);
    then rank 0 only ends, and ignores the signals that end jobs (``comm.
    ignore_ending_signals``: a late forwarded SIGTERM killed it in Python's teardown)."""
    if ending.begin_shutdown():
        _shut_down(exit_code)
    _comm.ignore_ending_signals()


def _shut_down(exit_code: int | None) -> None:
    rt = _runtime
    signum, since = ending.cut_by()
    interrupted = isinstance(getattr(sys, "last_value", None), KeyboardInterrupt)
    if rt is not None and not rt.closed:
        why = None
        if signum is not None:
            why = f"rank 0 got {ending.CUT_SIGNALS.get(signum, ending.signal_name(signum))}"
        elif interrupted:
            why = "rank 0 got Ctrl-C (KeyboardInterrupt)"
        rt.close(why=why, since=since)
    if interrupted:
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


def _one_target(key, ids: list[int], where) -> int:
    """One engine id from an int: an MPI rank, or counted from the end when negative."""
    if isinstance(key, bool) or not hasattr(key, "__index__"):
        raise TypeError(f"engines are selected by id (int), slice or list, not {key!r}"
                        + (f" (in {where!r})" if where is not None else ""))
    k = operator.index(key)
    if k < 0:
        if -k > len(ids):
            raise IndexError(f"engine index {k} is out of range: this job has {len(ids)} "
                             f"engines (ids {ids[0]}..{ids[-1]}; -1 is the last)")
        return ids[k]
    if k == CLIENT_RANK:
        raise IndexError("rank 0 is the client, not an engine; engine ids are "
                         f"{ids[0]}..{ids[-1]}")
    if k not in ids:
        raise IndexError(f"no engine {k}: engine ids are {ids[0]}..{ids[-1]} "
                         f"(this job has {len(ids) + 1} ranks)")
    return k


def _slice_targets(key: slice, ids: list[int]) -> list[int]:
    """Slices select by MPI rank. One whose ranks include 0 (the client) would hold fewer
    engines than its positions suggest (``c[:2]`` is engine 1 alone), so it is refused;
    ``c[:]`` (every engine) is the one exception."""
    ranks = range(len(ids) + 1)[key]
    if CLIENT_RANK in ranks and not (key.start in (None, 0) and key.stop is None
                                     and key.step in (None, 1)):
        held = [r for r in ranks if r != CLIENT_RANK]
        text = _slice_text(key)
        raise IndexError(
            f"slice {text} selects by MPI rank and includes rank 0, the client: it would "
            f"hold engines {held} only. Engine ids are ranks {ids[0]}..{ids[-1]}: write "
            f"ranks (c[1:3] is engines 1 and 2) or select by position with c[c.ids{text}]")
    return [r for r in ranks if r != CLIENT_RANK]


def _slice_text(key: slice) -> str:
    def f(x):
        return "" if x is None else str(x)
    text = f"{f(key.start)}:{f(key.stop)}" + (f":{key.step}" if key.step is not None else "")
    return f"[{text}]"


def _targets(key, ids: list[int]) -> list[int] | int:
    """Engine ids for ``client[key]`` / ``direct_view(key)``: an int (a single engine; negative
    counts from the end), a slice (by rank), or a list/tuple/range/array of ints. An engine
    named twice is an error: a view holds each engine once."""
    if isinstance(key, slice):
        return _slice_targets(key, ids)
    if isinstance(key, (str, bytes)) or not hasattr(key, "__iter__") \
            or getattr(key, "ndim", 1) == 0:
        return _one_target(key, ids, None)
    out = [_one_target(k, ids, key) for k in key]
    seen: set[int] = set()
    for k, e in zip(key, out):
        if e in seen:
            named = f"{k} (engine {e})" if k != e else f"{e}"
            raise IndexError(f"engine {named} appears twice in {list(key)!r}: a view holds "
                             "each engine once")
        seen.add(e)
    return out


class DirectView:
    """Some engines, addressed together: ``c[:]``, ``c[1]``, ``c[-1]``, ``c[1:3]``,
    ``c[[1, 3]]``, ``c.direct_view("all")``."""

    def __init__(self, runtime: _Runtime, targets: list[int] | int):
        self._rt = runtime
        self.targets = targets
        self.block = False
        self._outstanding: list[AsyncResult] = []  # submitted through this view, maybe running

    @property
    def targets(self) -> list[int]:
        """The view's engine ids (MPI ranks), in order."""
        return list(self._targets)

    @targets.setter
    def targets(self, targets) -> None:
        if not isinstance(targets, int) or isinstance(targets, bool):
            targets = _targets(targets, self._rt.ids)
        self._single = isinstance(targets, int)
        chosen = [targets] if self._single else list(targets)
        if not chosen:
            raise IndexError("this view selects no engines")
        _targets(chosen, self._rt.ids)  # (each exists, none twice)
        self._targets: list[int] = chosen

    def __repr__(self) -> str:
        return f"<DirectView {self._targets[0] if self._single else self._targets}>"

    def __len__(self) -> int:
        return len(self._targets)

    def _submit(self, targets, payloads, label, single, result_cls=AsyncResult) -> AsyncResult:
        ar = self._rt.submit(targets, payloads, label, single, result_cls)
        self._outstanding = [a for a in self._outstanding if not a.ready()]
        self._outstanding.append(ar)
        return ar

    def _finish(self, ar: AsyncResult, block: bool | None):
        return ar.get() if (self.block if block is None else block) else ar

    # -- apply ----------------------------------------------------------------------------------
    def _apply(self, fn, args, kwargs, label=None) -> AsyncResult:
        if not callable(fn) and not isinstance(fn, Reference):
            raise TypeError(f"apply() needs a callable, got {type(fn).__name__}")
        label = label or f"{_describe(fn)}()"
        p = (fn, args, kwargs)
        if contains_reference(p):
            p = (_ns.call_resolved, p, {})
        return self._submit(self._targets, [p] * len(self._targets), label, self._single)

    def apply_async(self, f: Callable, /, *args: Any, **kwargs: Any) -> AsyncResult:
        """Run ``f(*args, **kwargs)`` on every engine of the view; return at once."""
        return self._apply(f, args, kwargs)

    def apply_sync(self, f: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``f(*args, **kwargs)`` on every engine and wait for the results."""
        return self._apply(f, args, kwargs).get()

    def apply(self, f: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """``apply_sync`` if ``self.block`` else ``apply_async``."""
        return self._finish(self._apply(f, args, kwargs), None)

    # -- map ------------------------------------------------------------------------------------
    def map_async(self, f: Callable, /, *sequences: Sequence) -> AsyncMapResult:
        """Split the sequences across the view's engines in contiguous chunks; ``get()``
        returns ``[f(*xs) for xs in zip(*sequences)]`` in input order."""
        if not sequences:
            raise TypeError("map() needs at least one sequence")
        items = list(zip(*sequences))
        n = len(self._targets)
        chunks = [items[i * len(items) // n:(i + 1) * len(items) // n] for i in range(n)]
        targets = [t for t, c in zip(self._targets, chunks) if c] or self._targets[:1]
        chunks = [c for c in chunks if c] or [[]]
        payloads = [(_ns.run_map, (f, c), {}) for c in chunks]
        ar = self._submit(targets, payloads, f"map({_describe(f)})", False, AsyncMapResult)
        ar._rec.counts = {t: len(c) for t, c in zip(targets, chunks)}
        return ar  # type: ignore[return-value]

    def map_sync(self, f: Callable, /, *sequences: Sequence) -> list:
        """``map_async(f, *sequences).get()``: the results in input order."""
        return self.map_async(f, *sequences).get()

    def map(self, f: Callable, /, *sequences: Sequence, block: bool | None = None):
        """``map_sync`` if ``block`` (default: ``self.block``) else ``map_async``."""
        return self._finish(self.map_async(f, *sequences), block)

    # -- namespace ------------------------------------------------------------------------------
    def execute(self, code: str, block: bool | None = None) -> AsyncResult:
        """Run Python source in each engine's namespace. Returns the AsyncResult (after
        waiting for it, and raising its error, when blocking), as ipyparallel does."""
        if not isinstance(code, str):
            raise TypeError(f"execute() takes Python source as str, not {type(code).__name__}")
        ar = self._apply(_ns.run_execute, (code,), {}, label="execute()")
        if self.block if block is None else block:
            ar.get()
        return ar

    def run(self, filename: str | os.PathLike, block: bool | None = None) -> AsyncResult:
        """Run a Python file (read here, on the client) in each engine's namespace, like
        ``execute(open(filename).read())`` with the file named in tracebacks."""
        with open(filename, encoding="utf-8") as fh:
            code = fh.read()
        ar = self._apply(_ns.run_execute, (code, os.fspath(filename)), {}, label="execute()")
        if self.block if block is None else block:
            ar.get()
        return ar

    def push(self, ns: dict, block: bool | None = None):
        """Set names in each engine's namespace (dotted names set attributes: ``"a.b"``)."""
        if not isinstance(ns, dict):
            raise TypeError(f"push() takes a dict of name -> value, got {type(ns).__name__}")
        for k in ns:
            _ns.split_path(k)
        return self._finish(self._apply(_ns.run_push, (ns,), {}, label="push()"), block)

    def pull(self, names: str | Sequence[str], block: bool | None = None):
        """Read names (or dotted names) from each engine's namespace."""
        for k in [names] if isinstance(names, str) else names:
            _ns.split_path(k)
        return self._finish(self._apply(_ns.run_pull, (names,), {}, label="pull()"), block)

    def __getitem__(self, name: str):
        return self.pull(name, block=True)

    def __setitem__(self, name: str, value) -> None:
        self.push({name: value}, block=True)

    def clear(self, block: bool | None = None):
        """Empty each engine's namespace."""
        return self._finish(self._apply(_ns.run_clear, (), {}, label="clear()"), block)

    def scatter(self, key: str, seq: Sequence, flatten: bool = False,
                block: bool | None = None):
        """Split ``seq`` into contiguous parts, one per engine in view order (the first ones
        one longer when it does not divide; numpy arrays along axis 0), and set ``key`` to
        its part on each engine; ``flatten``: a part of one item is set as that item."""
        _ns.split_path(key)
        if not hasattr(seq, "__len__") or not hasattr(seq, "__getitem__"):
            raise TypeError(f"scatter() needs a sequence (list, tuple, array), not "
                            f"{type(seq).__name__}")
        parts = split_parts(seq, len(self._targets), flatten)
        payloads = [(_ns.run_push, ({key: part},), {}) for part in parts]
        ar = self._submit(self._targets, payloads, "scatter()", False)
        return self._finish(ar, block)

    def gather(self, key: str, block: bool | None = None):
        """Pull ``key`` from each engine and join the parts in view order: numpy arrays
        concatenated along axis 0, sequences into one list, single items appended."""
        _ns.split_path(key)
        p = (_ns.run_pull, (key,), {})
        ar = self._submit(self._targets, [p] * len(self._targets), "gather()", False,
                          AsyncGatherResult)
        return self._finish(ar, block)

    def sync_imports(self, local: bool = True, quiet: bool = False):
        """``with view.sync_imports(): import numpy`` imports on the client and on each
        engine (``import a.b`` and ``from a import b`` too; an ``as`` name is the client's
        only). ``quiet``: do not print what is imported."""
        if not local:
            raise ValueError("sync_imports(local=False) is not supported: the with block's "
                             "imports always run on the client too")
        return _SyncImports(self, quiet)

    # -- waiting, aborting, flags --------------------------------------------------------------
    def _jobs(self, jobs) -> list[AsyncResult]:
        if jobs is None:
            return [a for a in self._outstanding if not a.ready()]
        return _as_results(jobs)

    def wait(self, jobs=None, timeout: float | None = None) -> bool:
        """Wait for ``jobs`` (an AsyncResult or a list of them; default: every task this view
        has running) or ``timeout`` seconds; return whether all are done."""
        return _wait_all(self._jobs(jobs), timeout)

    def abort(self, jobs=None) -> None:
        """Abort ``jobs`` (an AsyncResult or a list; default: every task this view has
        running or queued): see ``AsyncResult.abort``."""
        for ar in self._jobs(jobs):
            ar.abort()

    @contextlib.contextmanager
    def temp_flags(self, **flags):
        """``with view.temp_flags(block=True): ...`` sets flags (``block``) for the block."""
        unknown = sorted(set(flags) - {"block"})
        if unknown:
            raise TypeError(f"temp_flags() knows the flag 'block' only, not {unknown}")
        saved = {k: getattr(self, k) for k in flags}
        for k, v in flags.items():
            setattr(self, k, v)
        try:
            yield self
        finally:
            for k, v in saved.items():
                setattr(self, k, v)

    def use_cloudpickle(self) -> None:
        """A no-op, for ipyparallel scripts: mpipub always sends functions with cloudpickle."""

    def use_pickle(self) -> None:
        """A no-op, for ipyparallel scripts: mpipub always sends functions with cloudpickle
        (by value from ``__main__``, by reference from importable modules, as pickle would)."""


def _as_results(jobs) -> list[AsyncResult]:
    items = [jobs] if isinstance(jobs, AsyncResult) else list(jobs)
    for j in items:
        if not isinstance(j, AsyncResult):
            raise TypeError(f"jobs are AsyncResults (or a list of them), not {type(j).__name__}")
    return items


def _wait_all(results: list[AsyncResult], timeout: float | None) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    for ar in results:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not ar.wait(left):
            return False
    return True


class _SyncImports:
    """``view.sync_imports()``: records the with block's own import statements (not the
    imports they trigger) and runs each on the engines when the block ends."""

    def __init__(self, view: DirectView, quiet: bool):
        self.view = view
        self.thread = threading.get_ident()  # (imports in other threads are not the block's)
        self.quiet = quiet
        self.statements: list[str] = []
        self.said: list[str] = []
        self._depth = 0

    def _import(self, name, globals=None, locals=None, fromlist=(), level=0):
        record = self._depth == 0 and level == 0 and threading.get_ident() == self.thread
        self._depth += 1
        try:
            mod = self._saved(name, globals, locals, fromlist, level)
        finally:
            self._depth -= 1
        if record:
            if fromlist:
                self.statements.append(f"from {name} import {', '.join(fromlist)}")
                self.said.append(f"importing {', '.join(fromlist)} from {name} on engine(s)")
            else:
                self.statements.append(f"import {name}")
                self.said.append(f"importing {name} on engine(s)")
        return mod

    def __enter__(self):
        self._saved = builtins.__import__
        builtins.__import__ = self._import
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        builtins.__import__ = self._saved
        if exc_type is not None or not self.statements:
            return
        if not self.quiet:
            print("\n".join(self.said))
        self.view.execute("\n".join(self.statements), block=True)
