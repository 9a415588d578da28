"""The engine's send side: publications coalesce into batches; every send is ordered.

Calling MPI once per ``publish_data`` costs more than the message itself for small and
medium arrays (docs/benchmarks.md, rows 1-3). So the call only copies into the open batch
(packing.py). The batch goes out

- from the caller's thread, as soon as it holds ``BATCH_BYTES`` or ``BATCH_PUBS``
  publications or is ``MAX_AGE_S`` old (a tight loop never waits for another thread);
- from the *flusher* thread, once no publication was added for ``LINGER_S`` (the last
  step before a compute phase goes out then, not at the next call; when the task publishes
  at a steady pace the flusher waits on a timer instead, up to ``WAKE_SLACK_S`` later).

Results, printed output and control messages take the same path behind any open batch, so
the client never sees a task's result before its data. The flusher also tests outstanding
sends while the caller computes, so large sends progress and their buffers return to the
pool; it sleeps without a timeout when there is nothing to watch (an idle engine costs no
CPU).
"""

from __future__ import annotations

import math
import signal
import threading
import time

from .. import config
from ..errors import MpipubError
from ..transport import wire
from ..transport.comm import CLIENT_RANK, TAG_BUF, TAG_MSG
from .batch import Batch, fastpub

# When the publishing thread seals a batch (BATCH_BYTES, BATCH_PUBS, MAX_AGE_S) and when a
# publication wakes the flusher (WAKE_SLACK_S): shared with the C path, declared in contract.py.
from .contract import BATCH_BYTES, BATCH_PUBS, MAX_AGE_S, SLAB_BYTES, WAKE_SLACK_S

#: The signals an engine turns into the end of its running task (engine/loop.py), handled on
#: the task's thread only.
_TASK_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
#: The flusher sends an open batch once nothing was added to it for this long (seconds).
LINGER_S = config.get("MPIPUB_LINGER_S")
#: The flusher tests outstanding sends (returning their buffers to the pool) with a sleep
#: that doubles from _PROGRESS_MIN_S to _PROGRESS_MAX_S while none completes.
_PROGRESS_MIN_S = 50e-6
_PROGRESS_MAX_S = 1e-3
#: A publication does not wake the flusher when it will look by itself within WAKE_SLACK_S
#: (docs/benchmarks.md, "Why the constants are what they are"). So a task that publishes at
#: a steady pace is served by a timer: once idle, the flusher sleeps until the next step is
#: due (the last interval between publications, plus LINGER_S and _EXPECT_LATE_S), and a
#: step that comes within WAKE_SLACK_S of that is posted then, up to that much later than a
#: wake-up would post it.
_EXPECT_LATE_S = 0.25e-3
_NEVER = -math.inf  # wakes_at of a flusher on a short timer: it looks by itself, never woken
_IDLE = math.inf  # wakes_at of a flusher with nothing to watch (no timeout): always woken


class Sender(object if fastpub is None else fastpub.SenderBase):  # type: ignore[misc]
    """Owns the engine's outbox (the open batch, the flusher thread and the send lock) and
    the running task's publishing state: ``task_id``, ``step`` (its publications so far),
    ``next_abort_poll`` (from then on a publication reads abort requests, in the Python
    path) and ``check_value`` (the sink's check, or None), set by ``begin_task``/``end_task``.

    With ``_fastpub`` built, plain publications skip ``add``: the C path (``fast_add``) adds
    them under the same lock to the same fields (contract.SENDER_FIELDS)."""

    def __init__(self, comm, MPI, *, max_bytes: int, max_count: int):
        self.pool = wire.BufferPool()
        self.outbox = wire.Outbox(comm, MPI, max_bytes=max_bytes, max_count=max_count,
                                  pool=self.pool)
        self.lock = threading.Lock()  # batches, outbox and pool
        self.batch: Batch | None = None  # open: add() and the C path add to it
        self.batch_type = Batch
        self.sealed: list[Batch] = []  # complete, not yet posted
        self.ready_slab = None  # a pooled slab for the C path to open a batch with
        self.task_id: int | None = None  # the running task (begin_task, end_task)
        self.step = 0  # its publications so far
        self.next_abort_poll = 0.0  # a publication reads abort requests from then on
        self.check_value = None  # the sink's check of published values, or None
        self.last_add = 0.0
        self.error: BaseException | None = None
        # a plain lock used as a binary semaphore: release() is the cheapest wake-up there is
        self._wake = threading.Lock()
        self._wake.acquire()
        self._lock_acquire = self.lock.acquire
        self._lock_release = self.lock.release
        self._wake_release = self._wake.release
        self.wakes_at = _NEVER  # when the flusher looks next by itself (_IDLE: never)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="mpipub-flusher", daemon=True)
        self._thread.start()

    # -- the task's thread ----------------------------------------------------------------------
    def begin_task(self, task_id: int) -> None:
        """A task starts: its publications count from step 0, the first reads aborts, and no
        sink checks them until the task's options say so (``check_value``)."""
        self.task_id = task_id
        self.step = 0
        self.next_abort_poll = 0.0
        self.check_value = None

    def end_task(self) -> None:
        """The task's result is sent: publications are refused until the next begin_task."""
        self.task_id = None
        self.check_value = None

    def add(self, t: float, data, copy: bool) -> None:
        """Add one publication as the task's next step, made at ``t`` (the Python path;
        raises batch.KeyNotStr or batch.ValueNotSendable naming the key, and then adds
        nothing; MpipubError once the flusher thread has failed)."""
        if self.error is not None:
            self._raise_error()
        with self.lock:
            b = self.batch
            if b is None:
                if len(self.outbox):
                    self.outbox.progress()  # finished sends' buffers back to the pool
                b = self.batch = Batch(self.task_id, self.pool)
            try:
                b.add(self.step, t, data, copy)
            except BaseException:
                if not b.pubs:  # refused as the first of a batch: no empty batch is left
                    self.batch = None
                    for buf in b.recycle:
                        self.pool.give(buf)
                raise
            self.step += 1
            self.last_add = t
            if b.nbytes >= BATCH_BYTES or len(b.pubs) >= BATCH_PUBS or t - b.first_t >= MAX_AGE_S:
                self.batch = None
                self.sealed.append(b)
                if len(self.sealed) > 1:
                    # the flusher has not had the GIL since the last one: post them here
                    self._post_sealed()
                wake = self.wakes_at - t > WAKE_SLACK_S  # it posts the sealed batch
            else:  # it starts its linger clock
                wake = len(b.pubs) == 1 and self.wakes_at - t > WAKE_SLACK_S
        # Only an idle flusher is woken (or one whose timer is far off): one on a short timer
        # looks by itself. Waking it at every batch cost a thread switch each time, which
        # slowed a 64 KiB stream when the flusher ran beside rank 0's I/O thread
        # (docs/benchmarks.md, "Why the constants are what they are").
        if wake:
            self._wake_flusher()

    def send(self, kind: int, task_id: int, step: int, obj, dumps, copy: bool) -> None:
        """Send a message (result, output, bye) after every publication added before it.
        Raises what ``dumps`` raises (nothing is sent then). Works without the flusher (after
        it failed): results and the goodbye still reach the client."""
        with self.lock:
            self.outbox.progress()  # finished sends' buffers back to the pool first
            enc = wire.encode(kind, task_id, step, obj, dumps, copy=copy, pool=self.pool)
            self._post_all()
            self.outbox.send(enc, CLIENT_RANK, TAG_MSG, TAG_BUF)
        if self.wakes_at - time.time() > WAKE_SLACK_S:
            self._wake_flusher()  # it tests the sends while we return to work

    def post(self) -> None:
        """Send the open batch now, without waiting for the sends to complete."""
        with self.lock:
            self._post_all()

    def drain(self) -> None:
        """Send every batch and wait until every send has completed."""
        with self.lock:
            self._post_all()
            self.outbox.flush()

    def close(self) -> None:
        """Stop the flusher thread (without waiting for sends: callers that want every send
        completed drain first; an engine leaving because the client is gone must not wait)."""
        self._closing = True
        self._wake_flusher()
        self._thread.join(timeout=2.0)  # (a daemon: it cannot keep the process alive)

    def _wake_flusher(self) -> None:
        self.wakes_at = _NEVER
        try:
            self._wake.release()
        except RuntimeError:  # already released (it woke on its own meanwhile)
            pass

    # -- posting (caller holds self.lock) -------------------------------------------------------
    def _post_all(self) -> None:
        if self.batch is not None:
            self.sealed.append(self.batch)
            self.batch = None
        self._post_sealed()

    def _post_sealed(self) -> None:
        sealed, self.sealed = self.sealed, []
        for b in sealed:
            enc = wire.frame(wire.DATA, b.task_id, b.pubs[0][0], b.first_t, b.metadata(),
                             b.buffers(), recycle=b.recycle, count=len(b.pubs),
                             payload=b.nbytes, last_t=b.pubs[-1][1])
            self.outbox.send(enc, CLIENT_RANK, TAG_MSG, TAG_BUF)

    def _raise_error(self):
        """Once the flusher has failed, publications are refused (nothing accepted is lost:
        the task's thread posts what was accepted, with the result)."""
        raise MpipubError(
            f"publish_data() refused on engine {self.outbox.comm.Get_rank()}, task "
            f"{self.task_id}, step {self.step}: the engine's flusher thread failed "
            f"({self.error!r}); the publications before this one reach the client, later ones "
            "are refused")

    # -- the flusher thread -----------------------------------------------------------------
    def _run(self) -> None:
        # Signals are the task thread's: Python runs handlers only there, and a signal the
        # kernel hands to this thread does not wake a task sleeping in C (time.sleep, a
        # blocking call), so a SIGTERM could leave it running for good.
        signal.pthread_sigmask(signal.SIG_BLOCK, _TASK_SIGNALS)
        try:
            self._flush_loop()
        except BaseException as exc:  # noqa: BLE001 - reported; the next publish raises it
            self.error = exc
            import sys
            import traceback  # (not at start-up: every rank pays its imports)

            sys.stderr.write(f"mpipub: engine {self.outbox.comm.Get_rank()}: the engine's "
                             f"flusher thread failed during task {self.task_id} (step "
                             f"{self.step}); its next publish_data raises:\n"
                             + traceback.format_exc())

    def _flush_loop(self) -> None:
        # The flusher never blocks on the lock: when the task's thread holds it, that thread
        # is publishing (and posts by itself when batches pile up), so we look again later.
        # Blocking would convoy the two threads on the lock and the GIL (docs/benchmarks.md,
        # "Why the constants are what they are"). While the task publishes, it also tests its
        # sends itself, so we only look every `busy` seconds (doubling to MAX_AGE_S): on an
        # oversubscribed node every wake-up takes a core from someone.
        lock = self.lock
        busy = LINGER_S
        poll = _PROGRESS_MIN_S
        seen_add = 0.0  # last_add when we last had nothing to do
        while not self._closing:
            timeout: float | None
            if lock.acquire(blocking=False):
                try:
                    if self.sealed:
                        self._post_sealed()
                    now = time.time()
                    quiet = now - self.last_add
                    b = self.batch
                    wakes_at = _NEVER
                    if quiet < LINGER_S and (b is None or now - b.first_t < MAX_AGE_S):
                        timeout = max(LINGER_S - quiet, busy)  # the task is publishing
                        busy = min(busy * 2, MAX_AGE_S)
                    else:
                        busy = LINGER_S
                        timeout = None
                        if b is not None:
                            self._post_all()
                        ob = self.outbox
                        if len(ob):
                            n = len(ob)
                            ob.progress()
                            if len(ob):
                                poll = _PROGRESS_MIN_S if len(ob) < n else min(
                                    poll * 2, _PROGRESS_MAX_S)
                                timeout = poll
                        if self.ready_slab is None and fastpub is not None and \
                                self.task_id is not None:
                            self.ready_slab = self.pool.take(SLAB_BYTES)
                        if timeout is None:
                            # nothing to do: expect the next step one interval after the last
                            last = self.last_add
                            interval, seen_add = last - seen_add, last
                            due = last + interval + LINGER_S + _EXPECT_LATE_S
                            if 0 < interval < 60 and due > now:
                                timeout, wakes_at = due - now, due
                            else:
                                wakes_at = _IDLE
                    # under the lock, so add() sees it once it has added to a batch
                    self.wakes_at = wakes_at
                finally:
                    lock.release()
            else:
                timeout = busy
                busy = min(busy * 2, MAX_AGE_S)
            self._wake.acquire(timeout=-1 if timeout is None else max(timeout, 1e-6))
            self.wakes_at = _NEVER
