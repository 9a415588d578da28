"""The client's I/O thread: the only place on rank 0 that receives from engines.

It keeps probing so engines' sends always progress, posts the client's outgoing sends for the
user's thread (which never blocks inside MPI), and hands every received message to a router
(the client's bookkeeping, and the HDF5 sink when there is one).
"""

from __future__ import annotations

import collections
import sys
import threading
import traceback
from typing import Callable

from .. import config
from ..transport import wire
from ..transport.comm import TAG_BUF, TAG_MSG, World
from ..transport.polling import Backoff

#: Idle polling on rank 0; the longest sleep bounds how stale ``ar.data`` can be.
POLL_MIN_S = 20e-6
POLL_GROWTH = 1.5
POLL_MAX_S = config.get("MPIPUB_CLIENT_POLL_MAX_S")
BATCH = 256  # messages received before looking at the outbox again
#: With no task outstanding (``quiet()``), the I/O thread waits this long for a post instead:
#: a post wakes it at once, and nothing is sent to rank 0 without a task (or a stop) posted
#: first. Polling every 0.5 ms cost an idle client 4-5% of a core (docs/benchmarks.md).
POLL_IDLE_S = 0.1


class IOThread(threading.Thread):
    """Receives every engine message and sends every client message on rank 0."""

    def __init__(self, world: World, route: Callable[[wire.Message], None],
                 on_fatal: Callable[[BaseException], None],
                 quiet: Callable[[], bool] | None = None):
        super().__init__(name="mpipub-io", daemon=True)
        self.comm = world.comm
        self.MPI = world.MPI
        self.route = route
        self.on_fatal = on_fatal
        self.quiet = quiet
        self.outq: collections.deque = collections.deque()
        self.outbox = wire.Outbox(self.comm, self.MPI, max_bytes=1 << 62, max_count=1 << 62)
        self.recv_pool = wire.RecvPool()
        self.wake = threading.Event()
        self._stop_flag = False
        self.error: BaseException | None = None

    def post(self, enc: wire.Encoded, dest: int, tag_head: int, tag_buf: int) -> None:
        """Queue a send (called from the user's thread; returns at once)."""
        self.outq.append((enc, dest, tag_head, tag_buf))
        self.wake.set()

    def stop(self) -> None:
        self._stop_flag = True
        self.wake.set()

    def service_outgoing(self) -> bool:
        """Post the queued client messages and progress those in flight (I/O thread only:
        its loop, and the sink while back-pressure holds the thread). True if any posted."""
        outq, outbox = self.outq, self.outbox
        worked = False
        while outq:
            enc, dest, th, tb = outq.popleft()
            outbox.send(enc, dest, th, tb)
            worked = True
        if len(outbox):
            outbox.progress()
        return worked

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - report, never die silently
            self.error = exc
            sys.stderr.write("mpipub: the client's I/O thread failed:\n" + traceback.format_exc())
            self.on_fatal(exc)

    def _loop(self) -> None:
        comm, MPI = self.comm, self.MPI
        status = MPI.Status()
        any_source = MPI.ANY_SOURCE
        idle = Backoff(POLL_MIN_S, POLL_GROWTH, POLL_MAX_S)
        outq, outbox, route = self.outq, self.outbox, self.route
        alloc = self.recv_pool.take
        improbe = wire.improbe
        service_outgoing = self.service_outgoing
        while True:
            worked = service_outgoing()
            if self._stop_flag and not outq:
                outbox.flush()
                return
            for _ in range(BATCH):
                msg = improbe(comm, any_source, TAG_MSG, status)
                if msg is None:
                    break
                route(wire.recv_message(comm, MPI, msg, status, TAG_BUF, alloc))
                worked = True
            if worked:
                idle.reset()
                continue
            if self.quiet is not None and not len(outbox) and self.quiet():
                self.wake.wait(POLL_IDLE_S)
            else:
                self.wake.wait(idle.next())
            self.wake.clear()
