"""The engine: every rank but 0 waits for tasks from the client, runs them, sends results.

Idle engines poll (matched probe, then a short sleep that grows while idle) instead of blocking
in MPI, because a blocking MPICH receive spins a whole core. Tasks run in the engine's main
thread; ``publish_data`` inside them hands publications to this engine's sender (sender.py).
"""

from __future__ import annotations

import builtins
import collections
import io
import linecache
import os
import pickle
import signal
import sys
import threading
import time
import types
import weakref

from .. import config
from ..errors import MpipubError, TaskAborted
from ..transport import wire
from ..transport.comm import CLIENT_RANK, TAG_CBUF, TAG_CTRL, World, ignore_ending_signals
from ..transport.polling import Backoff
from .batch import fastpub
from .sender import Sender

#: Idle polling: first sleep, growth factor and longest sleep (seconds). The longest sleep
#: bounds how long an idle engine takes to notice a task, and sets what idle engines cost
#: (every wake-up takes CPU, per idle engine on an oversubscribed node): 4 ms keeps both
#: small (docs/benchmarks.md, "Why the constants are what they are").
POLL_MIN_S = 20e-6
POLL_GROWTH = 1.5
POLL_MAX_S = config.get("MPIPUB_ENGINE_POLL_MAX_S")

#: Bound on what one engine has sent and the client has not received yet (bytes, and
#: publications; two messages may always be in flight, see wire.Outbox); past it
#: publish_data waits for the oldest send. 4 MiB: large enough to keep a transfer queued
#: at rank 0, small enough that what rank 0 reads is still in cache from the engine's copy
#: (docs/benchmarks.md, "Why the constants are what they are").
MAX_OUTSTANDING_BYTES = config.get("MPIPUB_MAX_OUTSTANDING_BYTES")
MAX_OUTSTANDING_COUNT = config.get("MPIPUB_MAX_OUTSTANDING_COUNT")
#: A running task reads abort requests at most this often (seconds), from publish_data: a
#: probe at every call would be most of a small publication's cost, and a call that polls
#: takes the Python path, not the C one (docs/benchmarks.md, "Why the constants are what they are").
ABORT_POLL_S = 0.05
#: An engine that got SIGTERM and has not been stopped by the client this long after it
#: (seconds) takes the client for gone and leaves, once its task has returned.
TERM_DEADLINE_S = 10.0

# The engine serving in this process, kept in one place: where _fastpub is built, in C, where
# publish_data's C path reads it (and its sender) on every call; else here.
if fastpub is not None:
    _get_current, _set_current = fastpub.current, fastpub.set_current
else:
    _current: list = [None]

    def _get_current():
        return _current[0]

    def _set_current(engine) -> None:
        _current[0] = engine


def current_engine() -> Engine | None:
    """The engine serving in this process, or None (on rank 0 or outside mpipub). The running
    task's publishing state is its ``sender``'s (task id, step, abort poll, sink check):
    publish_data (both paths) and the loop reach it through here."""
    return _get_current()


def fast_path_on() -> bool:
    """Whether publish_data takes the C path in this process now: where _fastpub is built
    (and MPIPUB_PURE_PYTHON is not set), while an engine serves."""
    return fastpub is not None and _get_current() is not None


def serve_and_exit(world: World) -> None:
    """Engine ranks: serve tasks until the client stops us, then end the process (status 0)."""
    Engine(world).serve()  # (leaves ignoring the signals that end jobs)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(0)


class _ForwardedStream(io.TextIOBase):
    """Stands in for sys.stdout/sys.stderr during a task: writes go to the engine's own stream
    (so `mpiexec` shows them as usual) and, line by line, to the client (``ar.stdout``)."""

    def __init__(self, engine: Engine, original, which: int):
        self._engine = engine
        self._original = original
        self._which = which
        self._pending: list[str] = []
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._pending.append(s)
        self._size += len(s)
        if "\n" in s or self._size > 8192:
            self.flush()
        return len(s)

    def flush(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self._size = 0
            if self._original is not None:
                # whole lines in one write, so engines' lines do not interleave mid-line
                self._original.write(text)
                self._original.flush()
            self._engine.send(wire.OUTPUT, self._which, text)
        elif self._original is not None:
            self._original.flush()

    @property
    def encoding(self):
        return getattr(self._original, "encoding", "utf-8")

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._original.fileno()


class Engine:
    """One engine's state: its outbox, its namespace, the task it runs and that task's step."""

    def __init__(self, world: World, *, max_outstanding_bytes: int = MAX_OUTSTANDING_BYTES,
                 max_outstanding_count: int = MAX_OUTSTANDING_COUNT):
        self.world = world
        self.comm = world.comm
        self.MPI = world.MPI
        self.rank = world.rank
        self.host = world.hosts[world.rank]
        self.sender = Sender(self.comm, self.MPI, max_bytes=max_outstanding_bytes,
                             max_count=max_outstanding_count)
        self.namespace: dict = {"__name__": "__mpipub_engine__", "__builtins__": builtins}
        self.task_options: dict = {}
        self.busy = False
        self.busy_since_start = False  # the running task's function has been called
        self.aborted: dict[int, str | None] = {}  # task id -> reason
        # Tasks and stop requests received but not run yet, in the order sent (see recv_ctrl)
        self.inbox: collections.deque = collections.deque()
        self._status = self.MPI.Status()
        self.terminating_since: float | None = None
        self.terminated_during: str | None = None  # the task running at SIGTERM, for messages
        self.sending = False  # inside outbox.send: a signal is deferred (see _on_signal)
        self.deferred_signal: int | None = None
        self.task_label = ""  # the running task's function, for messages
        self.task_thread = threading.get_ident()  # tasks run in the thread that serves
        # threads a task started and left running when it returned -> (task id, label): a
        # publication belongs to the task during which it is made, never to the next one
        self.stray_threads: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.thread_lock = threading.Lock()  # held by other threads' publish_data calls

    # -- sending ------------------------------------------------------------------------------
    def publish(self, data, copy: bool) -> None:
        """publish_data's Python path (what the C path does not take): read aborts now and
        then, then add ``data`` to the sender's open batch as the task's next step, with
        signals deferred meanwhile. Raises batch.KeyNotStr or batch.ValueNotSendable."""
        sender = self.sender
        t = time.time()
        if t >= sender.next_abort_poll:
            sender.next_abort_poll = t + ABORT_POLL_S
            self.poll_aborts()
        self.sending = True
        try:
            sender.add(t, data, copy)
        finally:
            self.sending = False
        if self.deferred_signal is not None:
            self._raise_deferred()

    def send(self, kind: int, step: int, obj, dumps=pickle.dumps, copy: bool = True) -> None:
        """Send a message to the client, behind every publication made before it. A Ctrl-C /
        SIGTERM that arrives meanwhile is raised only once the message is fully posted:
        raised in between, it would leave a header without its buffers (the client then
        waits for them forever) or a send whose memory Python frees while MPI reads it."""
        self.sending = True
        try:
            self.sender.send(kind, self.sender.task_id or 0, step, obj, dumps, copy)
        finally:
            self.sending = False
        if self.deferred_signal is not None:
            self._raise_deferred()

    def check_publishing_thread(self) -> None:
        """publish_data from a thread other than the task's: refuse it if that thread was
        started by a task that has returned (its data would land in another task)."""
        th = threading.current_thread()
        owner = self.stray_threads.get(th)
        if owner is None:
            return
        task_id, label, warned = owner
        if not warned:
            self.stray_threads[th] = (task_id, label, True)
            sys.__stderr__.write(f"mpipub: engine {self.rank}: thread {th.name!r}, started by "
                                 f"task {task_id} ({label}), still calls publish_data after "
                                 "that task returned; its publications are refused\n")
        raise MpipubError(
            f"publish_data() called from thread {th.name!r}, which task {task_id} ({label}) "
            f"started on engine {self.rank} and left running when it returned; a publication "
            "belongs to the task during which it is made: join the thread before the task "
            "returns")

    def _raise_deferred(self) -> None:
        signum, self.deferred_signal = self.deferred_signal, None
        self._on_signal(signum, None)

    # -- control from the client ------------------------------------------------------------
    def _recv(self, tag: int):
        msg = wire.improbe(self.comm, CLIENT_RANK, tag, self._status)
        if msg is None:
            return None
        return wire.recv_message(self.comm, self.MPI, msg, self._status, TAG_CBUF)

    def recv_ctrl(self) -> None:
        """Receive every control message that has arrived: tasks and stop requests queue in
        ``inbox``, aborts are recorded at once. Tasks, aborts and stops share one tag, so
        MPI's non-overtaking order holds: an abort is read no later than any task sent after
        it, and reading them all before a task starts sees every abort that has arrived,
        however many tasks were queued before it (with a tag of its own, a probe for aborts
        missed those still behind unread tasks)."""
        while (m := self._recv(TAG_CTRL)) is not None:
            if m.kind == wire.ABORT:
                task_id = self.sender.task_id
                if task_id is None or m.task_id >= task_id:  # (else: already done)
                    self.aborted[m.task_id] = m.decode()
            else:
                self.inbox.append(m)

    def poll_aborts(self) -> None:
        """Read control messages; raise TaskAborted if the running task was aborted."""
        self.recv_ctrl()
        task_id = self.sender.task_id
        if task_id is not None and task_id in self.aborted:
            why = self.aborted[task_id] or "by the client (AsyncResult.abort())"
            when = (f"after {self.sender.step} publications" if self.busy_since_start else
                    "before it started")
            raise TaskAborted(f"task {task_id} was aborted {why} on engine {self.rank} {when}")

    def serve(self) -> None:
        """Run tasks until the client says stop; then the process only ends, so the signals
        that end jobs are ignored from there on (``comm.ignore_ending_signals``: before the
        sender's threads are joined, where a late forwarded SIGTERM used to kill engines)."""
        _set_current(self)  # (publish_data's C path publishes from this thread only)
        _announce_deaths(self)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        idle = Backoff(POLL_MIN_S, POLL_GROWTH, POLL_MAX_S)
        try:
            while True:
                if not self.inbox:
                    self.recv_ctrl()
                m = self.inbox.popleft() if self.inbox else None
                if m is None:
                    if self.terminating_since and \
                            time.monotonic() - self.terminating_since > TERM_DEADLINE_S:
                        self._leave_after_sigterm()
                        return
                    time.sleep(idle.next())
                    continue
                idle.reset()
                if m.kind == wire.STOP:
                    self.sender.drain()
                    self.send(wire.BYE, 0, None)
                    self.sender.drain()
                    return
                if m.kind == wire.TASK:
                    self.run_task(m)
        finally:
            ignore_ending_signals()
            _set_current(None)
            self.sender.close()

    def _leave_after_sigterm(self) -> None:
        """SIGTERM and no stop from the client within TERM_DEADLINE_S: it is gone or cannot
        reach us. Say so (which engine, which task ran at SIGTERM) and say goodbye, posted
        without waiting for it (the client may be gone), so a client that is still there
        neither waits for this engine at its end nor sends it tasks."""
        waited = time.monotonic() - (self.terminating_since or 0.0)
        during = f"during {self.terminated_during}" if self.terminated_during else "while idle"
        sys.stderr.write(f"mpipub: engine {self.rank} ({self.host}) got SIGTERM {waited:.0f} s "
                         f"ago {during}, and the client has not stopped it since; leaving\n")
        sys.stderr.flush()
        self.send(wire.BYE, 0, None)

    def _on_signal(self, signum, frame):
        """Ctrl-C / SIGTERM / SIGUSR1 (SLURM's time-limit warning) reach every rank: a busy
        task is interrupted (the client gets its error); an idle engine keeps serving until
        the client, which got the signal too, stops it. This keeps a clean shutdown (and a
        flushed sink) on rank 0."""
        if signum == signal.SIGTERM:
            self.terminating_since = time.monotonic()
            if (task_id := self.sender.task_id) is not None:
                self.terminated_during = f"task {task_id} ({self.task_label})"
        if self.sending and self.busy:
            self.deferred_signal = signum  # raised by post() once the sends are posted
            return
        if self.busy:
            self.busy = False  # a second signal while unwinding is ignored
            if signum != signal.SIGINT:
                raise TaskAborted(f"task {self.sender.task_id} on engine {self.rank} got "
                                  f"{signal.Signals(signum).name}")
            raise KeyboardInterrupt

    # -- running a task ---------------------------------------------------------------------
    def run_task(self, m: wire.Message) -> None:
        self.sender.begin_task(m.task_id)
        self.aborted = {t: r for t, r in self.aborted.items() if t >= m.task_id}
        t0 = time.time()
        ok, value = True, None
        out, err = sys.stdout, sys.stderr
        threads_before = set(threading.enumerate())
        label = "a task that could not be decoded"
        try:
            fn, args, kwargs, options = m.decode()
            label = f"{getattr(fn, '__qualname__', None) or type(fn).__name__}()"
            self.task_label = label
            self.task_options = options or {}
            # the sink's check: the C path takes only values its table surely accepts
            self.sender.check_value = self.task_options.get("check_value")
            fn = self._bind(fn)
            sys.stdout = _ForwardedStream(self, out, 1)
            sys.stderr = _ForwardedStream(self, err, 2)
            self.busy = True
            self.busy_since_start = False
            self.poll_aborts()  # an abort that arrived before the task starts skips it
            self.busy_since_start = True
            value = _call_as_task(m.task_id, self.rank, self.host, label)(fn, args, kwargs)
        except BaseException as exc:  # noqa: BLE001 - every failure is reported, engine lives on
            self.busy = False
            ok = False
            value = self._error_info(exc)
        finally:
            self.busy = False
            with self.thread_lock:  # (no other thread is inside publish_data now)
                for th in set(threading.enumerate()) - threads_before:
                    self.stray_threads[th] = (m.task_id, label, False)
            for s in (sys.stdout, sys.stderr):
                if isinstance(s, _ForwardedStream):
                    try:
                        s.flush()
                    except Exception:  # noqa: BLE001
                        pass
            sys.stdout, sys.stderr = out, err
        t1 = time.time()
        try:
            # every publication completes before the result is sent (and zero-copy arrays
            # are free for the caller again once the task has returned)
            self.sender.drain()
            self.send(wire.RESULT, self.sender.step, (ok, value, t0, t1),
                      wire.cloudpickle().dumps)
        except Exception as exc:  # noqa: BLE001 - e.g. the result cannot be pickled
            info = self._error_info(exc)
            info = (info[0], f"the task's return value could not be sent to the client: {info[1]}",
                    info[2])
            self.send(wire.RESULT, self.sender.step, (False, info, t0, t1),
                      wire.cloudpickle().dumps)
        self.sender.drain()
        self.sender.end_task()
        self.task_options = {}

    def _error_info(self, exc: BaseException) -> tuple[str, str, str]:
        tb_obj = exc.__traceback__
        # start at the user's function: not at the engine loop, nor at the named call
        while tb_obj is not None and tb_obj.tb_next is not None and (
                tb_obj.tb_frame.f_code is Engine.run_task.__code__
                or _is_task_call(tb_obj.tb_frame.f_code)):
            tb_obj = tb_obj.tb_next
        import traceback

        tb = "".join(traceback.format_exception(type(exc), exc, tb_obj))
        return (type(exc).__name__, str(exc), tb)

    def _bind(self, fn):
        """Functions from ``__main__`` (scripts, notebooks) run in the engine's namespace, so
        names pushed with ``view.push`` or set by ``execute`` are visible to them; the globals
        they captured on the client travel with them and are set there first."""
        if isinstance(fn, types.FunctionType) and fn.__module__ == "__main__":
            ns = self.namespace
            source, lines = self.task_options.get("main_source") or (None, None)
            if lines:  # a notebook cell's code: its lines, for tracebacks (linecache's form)
                linecache.cache[source] = (sum(map(len, lines)), None, lines, source)
            script = source if lines is None else None  # every __main__ function is from it
            for k, v in fn.__globals__.items():
                if not (k.startswith("__") and k.endswith("__")):
                    if script and isinstance(v, types.FunctionType) and v.__module__ == "__main__":
                        v.__code__ = _with_filename(v.__code__, script)
                    ns[k] = v
            code = _with_filename(fn.__code__, source) if source else fn.__code__
            new = types.FunctionType(code, ns, fn.__name__, fn.__defaults__, fn.__closure__)
            new.__kwdefaults__ = fn.__kwdefaults__
            new.__dict__.update(fn.__dict__)
            new.__qualname__ = fn.__qualname__
            return new
        return fn


def _run_user_function(fn, args, kwargs):
    return fn(*args, **kwargs)


def _is_task_call(code: types.CodeType) -> bool:
    run = _run_user_function.__code__
    return code.co_filename == run.co_filename and code.co_firstlineno == run.co_firstlineno


def _call_as_task(task_id: int, rank: int, host: str, label: str):
    """``_run_user_function`` under a name that says where it runs: a segfault's Python
    traceback (faulthandler) then names the task, the engine and its host."""
    code = _run_user_function.__code__.replace(
        co_name=f"<task {task_id} {label} on engine {rank} ({host})>")
    return types.FunctionType(code, globals())


def _announce_deaths(engine: Engine) -> None:
    """An engine that dies ends the whole job (MPICH's hydra SIGKILLs every rank), and rank 0
    is killed before it can say which engine it was. So the engine says it: a crash
    (segfault, abort) prints a Python traceback through faulthandler, whose task frame is
    named by _call_as_task; ``os._exit`` in a task prints one line first."""
    import faulthandler

    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)
    real_exit = os._exit
    if getattr(real_exit, "_mpipub", False):
        return
    pid = os.getpid()

    def _exit(code: int) -> None:
        if os.getpid() == pid:  # (not in a child this engine forked)
            task_id = engine.sender.task_id
            task = f"task {task_id} ({engine.task_label})" if task_id is not None else "no task"
            try:
                sys.__stderr__.write(f"mpipub: engine {engine.rank} ({engine.host}) is exiting "
                                     f"with os._exit({code}) during {task}; the MPI launcher "
                                     "ends the whole job when one rank exits\n")
                sys.__stderr__.flush()
            except Exception:  # noqa: BLE001 - never keep a process from exiting
                pass
        real_exit(code)

    _exit._mpipub = True  # type: ignore[attr-defined]
    os._exit = _exit


def _with_filename(code: types.CodeType, path: str) -> types.CodeType:
    """cloudpickle names the file of functions sent by value ``<dynamic-code>``; give them
    back the client's script path so remote tracebacks show file and source lines."""
    if code.co_filename != "<dynamic-code>":
        return code
    consts = tuple(_with_filename(c, path) if isinstance(c, types.CodeType) else c
                   for c in code.co_consts)
    return code.replace(co_filename=path, co_consts=consts)
