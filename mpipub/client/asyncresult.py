"""``AsyncResult``: the client's handle on a task that runs on one or more engines.

The client's I/O thread fills a ``TaskRecord`` with the batches it receives, undecoded; the
user's thread reads it, decoding what it asks for (``data``: the newest value of each key;
``stream()``: every publication). Waits are sliced so Ctrl-C and Jupyter's "interrupt kernel"
always get through, and ``data`` is a snapshot: each engine's dict is replaced, never changed
in place.
"""

from __future__ import annotations

import collections
import datetime
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

from ..errors import CompositeError, MpipubError, RemoteError
from ..transport.packing import latest, unpack

#: ``AsyncResult.wait(return_when=...)``: the same strings as ``concurrent.futures``' constants,
#: so ``concurrent.futures.FIRST_EXCEPTION`` works as well.
ALL_COMPLETED = "ALL_COMPLETED"
FIRST_COMPLETED = "FIRST_COMPLETED"
FIRST_EXCEPTION = "FIRST_EXCEPTION"
_RETURN_WHEN = (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION)


def _datetime(t: float | None) -> datetime.datetime | None:
    return None if t is None else datetime.datetime.fromtimestamp(t)


_SLICE_S = 0.1  # longest uninterrupted wait in the user's thread


class Publication:
    """One ``publish_data`` call as the client received it (read-only).

    ``engine``: engine id (MPI rank); ``step``: per-engine, per-task counter starting at 0;
    ``time``: when the engine called publish_data (time.time() there); ``received``: when
    rank 0 received it; ``data``: what was published in that call (not merged).
    """

    # A plain slotted class, not a frozen dataclass: one is built per message on rank 0's
    # I/O thread, and a frozen dataclass's __init__ costs several times as much.
    __slots__ = ("engine", "step", "time", "received", "data")

    def __init__(self, engine: int, step: int, time: float, received: float, data: dict):
        self.engine = engine
        self.step = step
        self.time = time
        self.received = received
        self.data = data

    def __repr__(self) -> str:
        return (f"Publication(engine={self.engine}, step={self.step}, time={self.time!r}, "
                f"received={self.received!r}, data={self.data!r})")

    def __eq__(self, other) -> bool:
        if not isinstance(other, Publication):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None  # type: ignore[assignment]  (data is a dict)


class EngineStats:
    """Counters for one engine in one task: ``publications``, ``bytes``, ``last_step``,
    ``last_time`` (arrival time of the last publication on rank 0) and ``lag`` (its arrival
    minus publish time, seconds)."""

    # (a plain class, not a dataclass: importing dataclasses costs every rank ~10 ms at
    # start-up, benchmark row 6)
    __slots__ = ("publications", "bytes", "last_step", "last_time", "lag")

    def __init__(self, publications: int = 0, bytes: int = 0, last_step: int | None = None,
                 last_time: float | None = None, lag: float | None = None):
        self.publications = publications
        self.bytes = bytes
        self.last_step = last_step
        self.last_time = last_time
        self.lag = lag

    def _fields(self) -> tuple:
        return tuple(getattr(self, k) for k in self.__slots__)

    def __repr__(self) -> str:
        return "EngineStats(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    def __eq__(self, other) -> bool:
        if not isinstance(other, EngineStats):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  (mutable)


class _EngineState:
    """What the client knows about one engine in one task."""

    def __init__(self) -> None:
        self.data: dict = {}  # merged up to the batches in `unmerged`
        self.unmerged: list = []  # batches received since (oldest first)
        self.merging = threading.Lock()  # one merger at a time
        self.stats = EngineStats()
        self.done = False
        self.ok = False
        self.value: Any = None
        self.error: RemoteError | None = None
        self.started: float | None = None
        self.finished: float | None = None
        self.stdout: list = []
        self.stderr: list = []


class ReceivedBatch:
    """One message of publications from one engine, kept as received and decoded on first
    use: rank 0's I/O thread only counts it, so it is free to receive the next one (building
    every publication's arrays there took as long as receiving them, 4 engines at 64 KiB).
    ``ar.data`` rebuilds only the newest value of each key; ``stream()`` decodes the batches
    it reads."""

    __slots__ = ("engine", "task_id", "first_step", "first_seq", "count", "nbytes", "received",
                 "body", "buffers", "merged", "_pubs", "_reported")

    def __init__(self, engine: int, m, first_seq: int, received: float, reported: set,
                 pubs: list | None = None):
        self.engine = engine
        self.task_id = m.task_id
        self.first_step = m.step
        self.first_seq = first_seq  # sequence number of its first publication in the task
        self.count = m.count
        self.nbytes = m.payload
        self.received = received
        self.body = m.body
        self.buffers = m.buffers
        self.merged = False  # folded into ar.data (set under the record's lock)
        self._pubs = pubs
        self._reported = reported  # the task's undecodable values already reported

    def publications(self) -> list:
        """``[(step, time, dict, nbytes), ...]``, decoded once (values that cannot be
        rebuilt here are reported on stderr and left out)."""
        pubs = self._pubs
        if pubs is None:
            pubs = self._pubs = decode_batch(self.engine, self.task_id, self.first_step,
                                             self.body, self.buffers, self._reported)
        return pubs

    def merge_source(self) -> tuple:
        return self.body, self.buffers, self._pubs


def report_undecodable(engine: int, task_id: int, step: int, key: str | None,
                       exc: BaseException, reported: set | None = None) -> None:
    """Say on stderr what could not be rebuilt on the client, and where (never raised into
    the user's code: everything else that was published still arrives); once per value
    when ``reported`` (what was said already) is given."""
    if reported is not None:
        if (engine, step, key) in reported:
            return
        reported.add((engine, step, key))
    what = (f"step {step}: the value of key {key!r}" if key is not None else
            f"steps from {step}: the publications")
    sys.stderr.write(f"mpipub: engine {engine}, task {task_id}, {what} could not be decoded "
                     f"on the client and {'is' if key is not None else 'are'} left out: "
                     f"{exc!r}\n")


def decode_batch(engine: int, task_id: int, first_step: int, body, buffers,
                 reported: set | None = None) -> list:
    """``packing.unpack`` that reports (instead of raising) what cannot be decoded."""
    def on_error(step, key, exc):
        report_undecodable(engine, task_id, step, key, exc, reported)
    try:
        return unpack(body, buffers, on_error)
    except Exception as exc:  # noqa: BLE001 - the metadata itself: the whole batch
        report_undecodable(engine, task_id, first_step, None, exc, reported)
        return []


#: A batch still unmerged into ``ar.data`` is merged by the I/O thread once this many are
#: waiting (bounds the work a later ``ar.data`` does, and what they keep alive).
MERGE_AFTER = 64


class TaskRecord:
    """Everything the client knows about one submitted task (shared with the I/O thread)."""

    def __init__(self, task_id: int, engines: list[int], hosts: list[str], label: str,
                 history_bytes: int):
        self.task_id = task_id
        self.engines = list(engines)
        self.hosts = hosts
        self.label = label
        self.counts: dict[int, int] = {}  # map: items per engine
        self.submitted = time.time()
        self.finished: float | None = None
        self.state = {e: _EngineState() for e in engines}
        self.cond = threading.Condition()
        self.pending = len(engines)
        self.history: collections.deque = collections.deque()  # ReceivedBatch, oldest first
        self.history_first = 0  # number of batches dropped from the front of history
        self.history_pubs = 0  # publications received so far (next batch's first_seq)
        self.history_size = 0
        self.history_limit = history_bytes
        self.reported: set = set()  # (engine, step, key) of values that could not be decoded
        self.io_error: BaseException | None = None
        # threads blocked in stream(): only they need a wake-up per publication. Waking a
        # get()/wait() caller for every publication costs two GIL hand-offs per message and
        # made 64 KiB streams 2-4x slower (benchmarks/, row 1).
        self.data_waiters = 0

    # -- called by the I/O thread ---------------------------------------------------------------
    def on_batch(self, engine: int, m, pubs: list | None = None) -> None:
        """One received message of publications (``pubs``: already decoded, when a sink
        needed them). Counts it and keeps it; nothing is decoded here."""
        now = time.time()
        st = self.state[engine]
        b = ReceivedBatch(engine, m, self.history_pubs, now, self.reported, pubs)
        to_merge = set()  # engines whose unmerged batches the history is dropping
        with self.cond:
            st.unmerged.append(b)
            s = st.stats
            s.publications += b.count
            s.bytes += b.nbytes
            s.last_step = b.first_step + b.count - 1  # (a batch's steps are consecutive)
            s.last_time = now
            s.lag = now - m.last_time
            history = self.history
            history.append(b)
            self.history_pubs += b.count
            self.history_size += b.nbytes
            while self.history_size > self.history_limit and len(history) > 1:
                old = history.popleft()
                self.history_size -= old.nbytes
                self.history_first += 1
                if not old.merged:
                    to_merge.add(old.engine)
            if self.data_waiters:
                self.cond.notify_all()
        # Merge here only what would otherwise outlive the history (or pile up): the
        # batches ar.data still needs must not keep received memory alive past the limit.
        if len(st.unmerged) > MERGE_AFTER:
            to_merge.add(engine)
        for e in to_merge:
            self.merged_data(e)

    def merged_data(self, engine: int) -> dict:
        """``engine``'s latest data, merged key by key (a new dict whenever it changes)."""
        st = self.state[engine]
        with st.merging:
            with self.cond:
                batches, st.unmerged = st.unmerged, []
                base = st.data
                for b in batches:
                    b.merged = True
            if not batches:
                return base
            def on_error(step, key, exc):
                report_undecodable(engine, self.task_id, step, key, exc, self.reported)
            try:
                newest = latest([b.merge_source() for b in reversed(batches)], on_error)
            except Exception:  # noqa: BLE001 - a batch's metadata: merge them one by one
                newest = {}
                for b in batches:
                    newest.update(latest([(None, None, b.publications())]))
            merged = dict(base)
            merged.update(newest)
            with self.cond:
                st.data = merged
            return merged

    def on_output(self, engine: int, which: int, text: str) -> None:
        with self.cond:
            (self.state[engine].stdout if which == 1 else self.state[engine].stderr).append(text)

    def on_result(self, engine: int, ok: bool, value: Any, t0: float, t1: float) -> None:
        st = self.state[engine]
        with self.cond:
            if st.done:
                return
            st.started, st.finished = t0, t1
            st.ok = ok
            if ok:
                st.value = value
            else:
                ename, evalue, tb = value
                method = "execute" if self.label == "execute()" else "apply"
                st.error = RemoteError.from_engine(engine, self.hosts[engine], ename, evalue, tb,
                                                   method)
            st.done = True
            self.pending -= 1
            if self.pending == 0:
                self.finished = time.time()
            self.cond.notify_all()

    def fail_all(self, exc: BaseException) -> None:
        """The I/O thread died: wake every waiter with the reason instead of hanging."""
        with self.cond:
            self.io_error = exc
            self.cond.notify_all()


class AsyncResult:
    """A task submitted to one engine (``engine_id``) or several (``engine_ids``)."""

    def __init__(self, runtime, record: TaskRecord, single: bool,
                 engines: list[int] | None = None):
        self._rt = runtime
        self._rec = record
        self._single = single
        # the engines this handle covers: the task's, or some of them (split())
        self._engines = list(record.engines if engines is None else engines)
        self._whole = engines is None

    def _pending(self) -> int:
        if self._whole:
            return self._rec.pending
        return sum(not self._rec.state[e].done for e in self._engines)

    def split(self) -> list[AsyncResult]:
        """One single-engine AsyncResult per engine of this one (ipyparallel's ``split``):
        each has its engine's result, data, output and stream."""
        return [type(self)(self._rt, self._rec, True, [e]) for e in self._engines]

    @classmethod
    def join(cls, results: list[AsyncResult]) -> AsyncResult:
        """The inverse of ``split()``: one AsyncResult over the engines of ``results``, which
        must come from the same task (results of different tasks: wait on each, or use
        ``Client.wait``)."""
        results = list(results)
        if not results:
            raise ValueError("join() needs at least one AsyncResult")
        rec = results[0]._rec
        if any(r._rec is not rec for r in results):
            ids = sorted({r.task_id for r in results})
            raise ValueError(f"join() combines parts of one task; these come from tasks {ids}")
        engines = [e for r in results for e in r._engines]
        if len(set(engines)) != len(engines):
            raise ValueError(f"join(): an engine appears twice in {engines}")
        whole = sorted(engines) == sorted(rec.engines)
        return type(results[0])(results[0]._rt, rec, False, None if whole else engines)

    # -- identity -------------------------------------------------------------------------------
    @property
    def task_id(self) -> int:
        return self._rec.task_id

    @property
    def engine_ids(self) -> list[int]:
        return list(self._engines)

    @property
    def engine_id(self) -> int | list[int]:
        return self._engines[0] if self._single else list(self._engines)

    def __repr__(self) -> str:
        state = "done" if self.ready() else "running"
        return f"<AsyncResult task {self.task_id} {self._rec.label} on {self.engine_id}: {state}>"

    def _per_engine(self, values: list):
        return values[0] if self._single else values

    # -- data -----------------------------------------------------------------------------------
    @property
    def data(self) -> dict | list[dict]:
        """Latest published data, merged key by key: a list in engine order (a dict for a
        single-engine view). A snapshot: later publications do not change what you hold."""
        return self._per_engine([dict(self._rec.merged_data(e)) for e in self._engines])

    def data_at(self, step: int) -> dict | None | list[dict | None]:
        """What each engine published at ``step`` (not merged), like ``Run.data_at``: None
        where an engine has not published that step, or where it is older than the history
        the client keeps (``Client(history_bytes=...)``; a sink keeps every step)."""
        rec = self._rec
        with rec.cond:
            batches = list(rec.history)
        found: dict[int, dict | None] = {e: None for e in rec.engines}
        for b in reversed(batches):
            if found[b.engine] is None and b.first_step <= step < b.first_step + b.count:
                for s, _t, d, _n in b.publications():
                    if s == step:
                        found[b.engine] = dict(d)
                        break
        return self._per_engine([found[e] for e in rec.engines])

    @property
    def stats(self) -> dict[int, EngineStats]:
        """Per-engine counters: publications, bytes, last step, time of last arrival, lag."""
        with self._rec.cond:
            return {e: EngineStats(*self._rec.state[e].stats._fields())
                    for e in self._engines}

    @property
    def stdout(self) -> str | list[str]:
        """What the task printed to stdout on each engine (forwarded live)."""
        with self._rec.cond:
            return self._per_engine(["".join(self._rec.state[e].stdout) for e in self._engines])

    @property
    def stderr(self) -> str | list[str]:
        """What the task printed to stderr on each engine (forwarded live)."""
        with self._rec.cond:
            return self._per_engine(["".join(self._rec.state[e].stderr) for e in self._engines])

    # -- waiting --------------------------------------------------------------------------------
    def ready(self) -> bool:
        """True when every engine has returned (a result or an error)."""
        return self._pending() == 0

    def wait(self, timeout: float | None = None, return_when: str = ALL_COMPLETED) -> bool:
        """Wait until ready or ``timeout`` seconds; return ready(). Interruptible.

        ``return_when`` (as ``concurrent.futures.wait``): ``"ALL_COMPLETED"`` (default),
        ``"FIRST_COMPLETED"`` (any engine returned) or ``"FIRST_EXCEPTION"`` (any engine
        failed, or all returned)."""
        if return_when not in _RETURN_WHEN:
            raise ValueError(f"return_when must be one of {_RETURN_WHEN}, not {return_when!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        rec = self._rec
        with rec.cond:
            while not self._reached(return_when):
                self._check_io()
                left = _SLICE_S if deadline is None else min(_SLICE_S, deadline - time.monotonic())
                if left <= 0:
                    return self.ready()
                rec.cond.wait(left)
        return self.ready()

    def _reached(self, return_when: str) -> bool:
        rec = self._rec
        if not self._pending():
            return True
        states = [rec.state[e] for e in self._engines]
        if return_when == FIRST_COMPLETED:
            return any(st.done for st in states)
        if return_when == FIRST_EXCEPTION:
            return any(st.error is not None for st in states)
        return False

    def wait_for_output(self, timeout: float | None = None) -> bool:
        """Wait until every engine's output has arrived: an engine's output always reaches
        the client before its result, so this is ``wait(timeout)``."""
        return self.wait(timeout)

    def _check_io(self) -> None:
        if self._rec.io_error is not None:
            raise MpipubError(f"the client's I/O thread failed: {self._rec.io_error!r}; "
                              "task results can no longer arrive") from self._rec.io_error

    def get(self, timeout: float | None = None, return_exceptions: bool = False) -> Any:
        """Wait for the result(s): a list in engine order (one value for a single engine).

        Raises ``TimeoutError`` after ``timeout`` seconds; ``RemoteError`` if the task of a
        single-engine view failed, ``CompositeError`` (a RemoteError) listing each failed
        engine for a view of several (also when one of them failed). With
        ``return_exceptions=True`` each failed engine's RemoteError takes its result's place
        instead of being raised."""
        if not self.wait(timeout):
            done = sum(self._rec.state[e].done for e in self._engines)
            raise TimeoutError(f"task {self.task_id} ({self._rec.label}) not done after "
                               f"{timeout} s: {done} of {len(self._engines)} engines finished")
        if return_exceptions:
            return self._result_value(errors_as_values=True)
        errors = [self._rec.state[e].error for e in self._engines
                  if self._rec.state[e].error is not None]
        if errors:
            if self._single:
                raise errors[0]
            raise CompositeError.of(errors)
        return self._result_value()

    # concurrent.futures.Future's names (ipyparallel's AsyncResult is a Future)
    def result(self, timeout: float | None = None) -> Any:
        """``get(timeout)``."""
        return self.get(timeout)

    def done(self) -> bool:
        """``ready()``."""
        return self.ready()

    def exception(self, timeout: float | None = None) -> RemoteError | None:
        """The error ``get()`` would raise once done (None if every engine succeeded)."""
        try:
            self.get(timeout)
        except RemoteError as e:
            return e
        return None

    def get_dict(self, timeout: float | None = None) -> dict:
        """``{engine_id: result}`` (raises as ``get()`` does)."""
        self.get(timeout)
        return {e: self._rec.state[e].value for e in self._engines}

    # -- as a container (ipyparallel's) ---------------------------------------------------------
    def __len__(self) -> int:
        """How many results ``get()`` returns as a list: engines (items for ``map``)."""
        return len(self._engines)

    def _results_of(self, engine: int, errors_as_values: bool = False) -> list:
        st = self._rec.state[engine]
        if st.error is not None:
            if errors_as_values:
                return [st.error]
            raise st.error
        return [st.value]

    def __iter__(self) -> Iterator:
        """The results in ``get()``'s order, each as soon as it is there (an engine's error
        is raised when its turn comes)."""
        for e in self._engines:
            st = self._rec.state[e]
            with self._rec.cond:
                while not st.done:
                    self._check_io()
                    self._rec.cond.wait(_SLICE_S)
            yield from self._results_of(e)

    def __getitem__(self, key):
        """``ar[i]`` / ``ar[i:j]``: results (waits for them); ``ar["completed"]``: one
        metadata key, per engine (see ``metadata``)."""
        if isinstance(key, str):
            md = self._metadata_list()
            if key not in md[0]:
                raise KeyError(f"no metadata key {key!r}; keys are {sorted(md[0])}")
            return self._per_engine([m[key] for m in md])
        return list(self)[key]

    @property
    def sent(self) -> bool:
        """Always True: a task is handed to the I/O thread when it is submitted."""
        return True

    @property
    def progress(self) -> int:
        """How many engines have returned (a result or an error)."""
        return len(self._engines) - self._pending()

    def _metadata_list(self) -> list[dict]:
        rec = self._rec
        out = []
        with rec.cond:
            for e in self._engines:
                st = rec.state[e]
                out.append({
                    "engine_id": e, "host": rec.hosts[e], "task_id": rec.task_id,
                    "submitted": _datetime(rec.submitted), "started": _datetime(st.started),
                    "completed": _datetime(st.finished),
                    "status": None if not st.done else ("ok" if st.ok else "error"),
                    "error": st.error, "stdout": "".join(st.stdout),
                    "stderr": "".join(st.stderr),
                })
        return out

    @property
    def metadata(self) -> dict | list[dict]:
        """Per engine: ``engine_id``, ``host``, ``task_id``, ``submitted``, ``started``,
        ``completed`` (``datetime``, engine clocks for the last two; None until known),
        ``status`` (None, "ok" or "error"), ``error``, ``stdout``, ``stderr``. A list in
        engine order (one dict for a single engine)."""
        return self._per_engine(self._metadata_list())

    @property
    def submitted(self) -> datetime.datetime:
        return _datetime(self._rec.submitted)  # type: ignore[return-value]

    @property
    def started(self) -> datetime.datetime | None:
        """When the first engine started the task (None until one has returned)."""
        ts = [self._rec.state[e].started for e in self._engines]
        ts = [t for t in ts if t is not None]
        return _datetime(min(ts)) if ts else None

    @property
    def completed(self) -> datetime.datetime | None:
        """When the last engine finished (None until every engine has)."""
        if not self.ready():
            return None
        return _datetime(max(self._rec.state[e].finished for e in self._engines))

    @property
    def wall_time(self) -> float:
        """Seconds from submission to the last engine's result (``elapsed`` once done);
        raises if not ready."""
        self._check_ready("wall_time")
        return self.elapsed

    @property
    def serial_time(self) -> float:
        """Sum over engines of the seconds each spent running the task; raises if not ready."""
        self._check_ready("serial_time")
        return sum(self._rec.state[e].finished - self._rec.state[e].started
                   for e in self._engines)

    def _check_ready(self, what: str) -> None:
        if not self.ready():
            raise MpipubError(f"task {self.task_id} is not done yet, so {what} is not known; "
                              "call wait() first")

    def display_outputs(self, groupby: str = "type") -> None:
        """Print what each engine printed, under ``[stdout:N]`` / ``[stderr:N]`` headers:
        ``groupby="type"`` all stdout then all stderr, ``"engine"`` engine by engine."""
        if groupby not in ("type", "engine", "order"):
            raise ValueError(f"groupby must be 'type', 'engine' or 'order', not {groupby!r}")
        with self._rec.cond:
            outs = [(e, "".join(self._rec.state[e].stdout), "".join(self._rec.state[e].stderr))
                    for e in self._engines]
        def show(kind: str, e: int, text: str) -> None:
            if text:
                stream = sys.stdout if kind == "stdout" else sys.stderr
                stream.write(f"[{kind}:{e}] " + text + ("" if text.endswith("\n") else "\n"))
        if groupby == "type":
            for e, out, _ in outs:
                show("stdout", e, out)
            for e, _, err in outs:
                show("stderr", e, err)
        else:
            for e, out, err in outs:
                show("stdout", e, out)
                show("stderr", e, err)

    def _result_value(self, errors_as_values: bool = False):
        return self._per_engine([r for e in self._engines
                                 for r in self._results_of(e, errors_as_values)])

    def successful(self) -> bool:
        """True if every engine returned without error; raises if not ready yet."""
        if not self.ready():
            raise MpipubError(f"task {self.task_id} is not done yet; call wait() or ready() first")
        return all(self._rec.state[e].ok for e in self._engines)

    @property
    def elapsed(self) -> float:
        """Seconds from submission to the last engine's result (or to now, while running)."""
        if self._whole:
            end = self._rec.finished
        else:
            end = max(self._rec.state[e].finished or 0.0 for e in self._engines) \
                if self.ready() else None
        end = end if end is not None else time.time()
        return end - self._rec.submitted

    def abort(self) -> None:
        """Ask every engine still running this task to stop it. The task raises
        ``TaskAborted`` at its next ``publish_data`` call (a task that never publishes cannot
        be aborted; it runs to its end). Queued, not yet started tasks are skipped."""
        pending = [e for e in self._engines if not self._rec.state[e].done]
        self._rt.abort(self.task_id, pending)

    # -- streaming ------------------------------------------------------------------------------
    def stream(self, timeout: float | None = None) -> Iterator[Publication]:
        """Yield every publication in arrival order, until the task is done and all are read.

        ``timeout``: longest wait for the next publication (TimeoutError). Publications older
        than the client's ``history_bytes`` limit are dropped with a warning saying how many.
        """
        rec = self._rec
        seq = 0  # next publication to yield (its sequence number in the task)
        bi = 0  # the batch holding it (its number in the task: history[bi - history_first])
        while True:
            with rec.cond:
                deadline = None if timeout is None else time.monotonic() + timeout
                while bi >= rec.history_first + len(rec.history) and self._pending():
                    self._check_io()
                    left = _SLICE_S if deadline is None else min(_SLICE_S,
                                                                  deadline - time.monotonic())
                    if left <= 0:
                        raise TimeoutError(f"no publication from task {self.task_id} within "
                                           f"{timeout} s")
                    rec.data_waiters += 1
                    try:
                        rec.cond.wait(left)
                    finally:
                        rec.data_waiters -= 1
                if bi < rec.history_first:
                    first = rec.history[0].first_seq
                    warnings.warn(
                        f"stream(): {first - seq} publications of task "
                        f"{self.task_id} were dropped before being read (history limit "
                        f"{rec.history_limit} bytes; raise Client(history_bytes=...) or use a "
                        "sink to keep every step)", RuntimeWarning, stacklevel=2)
                    bi, seq = rec.history_first, first
                if bi >= rec.history_first + len(rec.history):
                    return  # done and everything read
                b = rec.history[bi - rec.history_first]
            if not self._whole and b.engine not in self._engines:  # (split(): not ours)
                bi += 1
                seq = b.first_seq + b.count
                continue
            pubs = b.publications()  # (decoded outside the lock: the I/O thread goes on)
            k = seq - b.first_seq
            if k >= len(pubs):  # the batch is read (or could not be decoded)
                bi += 1
                seq = b.first_seq + b.count
                continue
            step, t, data, _ = pubs[k]
            seq += 1
            yield Publication(b.engine, step, t, b.received, data)

    def wait_interactive(self, interval: float = 0.2, timeout: float | None = None,
                         return_when: str = ALL_COMPLETED) -> None:
        """Wait with a progress bar on stderr: engines done and steps published
        (``return_when``: as for ``wait``)."""
        if return_when not in _RETURN_WHEN:
            raise ValueError(f"return_when must be one of {_RETURN_WHEN}, not {return_when!r}")
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            tqdm = None
        n = len(self._engines)
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = tqdm(total=n, desc=f"task {self.task_id}", unit="engine", file=sys.stderr) \
            if tqdm else None
        try:
            while True:
                done = n - self._pending()
                steps = sum(self._rec.state[e].stats.publications for e in self._engines)
                if bar is not None:
                    bar.n = done
                    bar.set_postfix(steps=steps, refresh=False)
                    bar.refresh()
                if self._reached(return_when):
                    break
                left = interval if deadline is None else min(interval, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError(f"task {self.task_id} not done after {timeout} s")
                self.wait(left, return_when)
        finally:
            if bar is not None:
                bar.close()


class AsyncMapResult(AsyncResult):
    """Result of ``view.map_async``: ``get()`` returns one flat list in input order;
    ``len()``, iteration and ``ar[i]`` are over the items; ``get_dict()`` gives each
    engine's part."""

    def _results_of(self, engine: int, errors_as_values: bool = False) -> list:
        st = self._rec.state[engine]
        if st.error is not None:
            if errors_as_values:
                return [st.error] * self._rec.counts.get(engine, 1)
            raise st.error
        return list(st.value)

    def _result_value(self, errors_as_values: bool = False):
        return [r for e in self._engines for r in self._results_of(e, errors_as_values)]

    def __len__(self) -> int:
        return sum(self._rec.counts.get(e, 1) for e in self._engines)


class AsyncGatherResult(AsyncResult):
    """Result of ``view.gather``: ``get()`` joins the engines' parts (in engine order) into
    one list, or one array when they are numpy arrays."""

    def _result_value(self, errors_as_values: bool = False):
        parts = [r for e in self._engines for r in self._results_of(e, errors_as_values)]
        if errors_as_values and any(isinstance(p, RemoteError) for p in parts):
            return parts
        return join_parts(parts)

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator:
        yield self.get()


def split_parts(seq, n: int, flatten: bool = False) -> list:
    """``seq`` in ``n`` contiguous parts, the first ones one longer when it does not divide
    (ipyparallel's partition); numpy arrays are sliced along axis 0. ``flatten``: a part of
    one item is sent as that item."""
    size = len(seq)
    base, extra = divmod(size, n)
    parts, lo = [], 0
    for i in range(n):
        hi = lo + base + (1 if i < extra else 0)
        part = seq[lo:hi]
        if not hasattr(part, "__array_interface__") and not isinstance(part, (list, tuple, str)):
            part = list(part)
        parts.append(part[0] if flatten and len(part) == 1 else part)
        lo = hi
    return parts


def join_parts(parts: list):
    """Undo ``split_parts``: numpy arrays are concatenated along axis 0, sequences joined
    into one list, and a single item (a flattened part) appended."""
    if parts and all(hasattr(p, "__array_interface__") and getattr(p, "ndim", 0) > 0
                     for p in parts):
        import numpy as np

        return np.concatenate(parts)
    out: list = []
    for p in parts:
        if isinstance(p, (list, tuple)) or (hasattr(p, "__array_interface__")
                                            and getattr(p, "ndim", 0) > 0):
            out.extend(p)
        else:
            out.append(p)
    return out
