"""The engine's send side: publications coalesce into batches; every send is ordered.

Calling MPI once per ``publish_data`` costs more than the message itself for small and
medium arrays (benchmarks/, rows 1-3). So the call only copies into the open batch
(packing.py). The batch goes out

- from the caller's thread, as soon as it holds ``BATCH_BYTES`` or ``BATCH_PUBS``
  publications or is ``MAX_AGE_S`` old (a tight loop never waits for another thread);
- from the *flusher* thread, once no publication was added for ``LINGER_S`` (the last
  step before a compute phase reaches the client ~0.1 ms later, not at the next call).

Results, printed output and control messages take the same path behind any open batch, so
the client never sees a task's result before its data. The flusher also tests outstanding
sends while the caller computes, so large sends progress and their buffers return to the
pool; it sleeps without a timeout when there is nothing to watch (an idle engine costs no
CPU).
"""

from __future__ import annotations

import os
import threading
import time

from . import wire
from .comm import CLIENT_RANK, TAG_BUF, TAG_MSG
from .errors import MpipubError
from .packing import Batch

#: A batch is sent by the publishing thread once it holds this many bytes or publications,
#: or is this old (seconds): bounds the client's staleness during a tight loop.
BATCH_BYTES = 1 << 20
BATCH_PUBS = 256
MAX_AGE_S = 0.002
#: The flusher sends an open batch once nothing was added to it for this long (seconds).
LINGER_S = float(os.environ.get("MPIPUB_LINGER_S", "0.0001"))
#: The flusher tests outstanding sends (returning their buffers to the pool) with a sleep
#: that doubles from _PROGRESS_MIN_S to _PROGRESS_MAX_S while none completes.
_PROGRESS_MIN_S = 50e-6
_PROGRESS_MAX_S = 1e-3


class Sender:
    """Owns the engine's outbox: the open batch, the flusher thread and the send lock."""

    def __init__(self, comm, MPI, *, max_bytes: int, max_count: int):
        self.pool = wire.BufferPool()
        self.outbox = wire.Outbox(comm, MPI, max_bytes=max_bytes, max_count=max_count,
                                  pool=self.pool)
        self.lock = threading.Lock()  # batches, outbox and pool
        self.batch: Batch | None = None  # open: publish() adds to it
        self.sealed: list[Batch] = []  # complete, not yet posted
        self.last_add = 0.0
        self.error: BaseException | None = None
        # a plain lock used as a binary semaphore: release() is the cheapest wake-up there is
        self._wake = threading.Lock()
        self._wake.acquire()
        self._flusher_idle = False  # in its wait with nothing to watch (no timeout)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="mpipub-flusher", daemon=True)
        self._thread.start()

    # -- the task's thread ----------------------------------------------------------------------
    def publish(self, task_id: int, step: int, t: float, data, copy: bool) -> None:
        """Add one publication (raises packing.ValueNotSendable naming the key)."""
        if self.error is not None:
            self._raise_error()
        with self.lock:
            b = self.batch
            if b is None:
                if len(self.outbox):
                    self.outbox.progress()  # finished sends' buffers back to the pool
                b = self.batch = Batch(task_id, self.pool)
            try:
                b.add(step, t, data, copy)
            except BaseException:
                if not b.pubs:  # refused as the first of a batch: no empty batch is left
                    self.batch = None
                    for buf in b.recycle:
                        self.pool.give(buf)
                raise
            self.last_add = t
            if b.nbytes >= BATCH_BYTES or len(b.pubs) >= BATCH_PUBS or t - b.first_t >= MAX_AGE_S:
                self.batch = None
                self.sealed.append(b)
                if len(self.sealed) > 1:
                    # the flusher has not had the GIL since the last one: post them here
                    self._post_sealed()
                wake = self._flusher_idle  # it posts the sealed batch
            else:
                wake = self._flusher_idle and len(b.pubs) == 1  # it starts its linger clock
        # Only an idle flusher is woken: one on a timer looks by itself. Waking it at every
        # batch cost a thread switch each time, ~10% of a 64 KiB stream when the kernel put
        # the flusher beside rank 0's I/O thread (threads pinned: 5.0-5.1 against 5.4-5.9
        # GB/s); woken only when idle, where it runs made no difference (5.0-5.6 GB/s).
        if wake:
            self._wake_flusher()

    def send(self, kind: int, task_id: int, step: int, obj, dumps, copy: bool) -> None:
        """Send a message (result, output, bye) after every publication added before it.
        Raises what ``dumps`` raises (nothing is sent then)."""
        if self.error is not None:
            self._raise_error()
        with self.lock:
            self.outbox.progress()  # finished sends' buffers back to the pool first
            enc = wire.encode(kind, task_id, step, obj, dumps, copy=copy, pool=self.pool)
            self._post_all()
            self.outbox.send(enc, CLIENT_RANK, TAG_MSG, TAG_BUF)
        if self._flusher_idle:
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
        if self.error is not None:
            self._raise_error()

    def close(self) -> None:
        """Stop the flusher thread (without waiting for sends: callers that want every send
        completed drain first; an engine leaving because the client is gone must not wait)."""
        self._closing = True
        self._wake_flusher()
        self._thread.join(timeout=2.0)  # (a daemon: it cannot keep the process alive)

    def _wake_flusher(self) -> None:
        self._flusher_idle = False
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
        raise MpipubError(f"this engine can no longer send to the client: {self.error!r}")

    # -- the flusher thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._flush_loop()
        except BaseException as exc:  # noqa: BLE001 - reported; the next publish raises it
            self.error = exc
            import sys
            import traceback  # (not at start-up: every rank pays its imports)

            sys.stderr.write("mpipub: the engine's flusher thread failed:\n"
                             + traceback.format_exc())

    def _flush_loop(self) -> None:
        # The flusher never blocks on the lock: when the task's thread holds it, that thread
        # is publishing (and posts by itself when batches pile up), so we look again later.
        # Blocking would convoy the two threads on the lock and the GIL (measured: 1 MiB
        # publications 4x slower). While the task publishes, it also tests its sends itself,
        # so we only look every `busy` seconds (doubling to MAX_AGE_S): on an oversubscribed
        # node every wake-up takes a core from someone.
        lock = self.lock
        busy = LINGER_S
        poll = _PROGRESS_MIN_S
        while not self._closing:
            timeout: float | None
            if lock.acquire(blocking=False):
                try:
                    if self.sealed:
                        self._post_sealed()
                    now = time.time()
                    quiet = now - self.last_add
                    b = self.batch
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
                    # under the lock, so publish() sees it once it has added to a batch
                    self._flusher_idle = timeout is None
                finally:
                    lock.release()
            else:
                timeout = busy
                busy = min(busy * 2, MAX_AGE_S)
            self._wake.acquire(timeout=-1 if timeout is None else max(timeout, 1e-6))
            self._flusher_idle = False
