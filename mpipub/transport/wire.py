"""How Python objects travel: pickle protocol 5 with numpy buffers out of band.

A message is one *header* on a header tag, then its raw buffers on a buffer tag, in order (MPI
never lets messages from one sender on one tag overtake each other). Small messages travel as
one MPI message: the header carries the buffers inline (one copy, cheap below the threshold,
and much faster than two messages). The header is bytes:

    magic kind inline pad (u8 each) nbufs(u32) task_id(i64) step(i64) time(f64) bodylen(u64)
    count(u32) payload(u64) last_time(f64) | buf(u64) * nbufs | body (pickle) | [inline buffers]

where each ``buf`` is a raw buffer's length << 6 | its address mod 64 on the sender (the
receiver puts its copy at the same offset in a cache line: see CACHE_LINE; 0 for inline
buffers, which the header carries),

so routing fields are read without unpickling, and a body that fails to unpickle still says
which task and step it belonged to. For a batch of publications, ``step``/``time`` are its
first publication's, ``last_time`` its last one's, ``count`` how many it carries and
``payload`` their bytes: the client counts a batch without decoding it (packing.py).

Inline buffers start on 16-byte boundaries so the arrays rebuilt from them are aligned.
"""

from __future__ import annotations

import collections
import pickle
import struct
import time

from .polling import Backoff

MAGIC = 0xB6  # 0xB5 before the buffers' entries carried their offset in a cache line
# magic kind inline pad nbufs task_id step time bodylen count payload last_time
_FIXED = struct.Struct("<BBBxIqqdQIQd")
_BUF = struct.Struct("<Q")  # a raw buffer: length << LINE_BITS | sender's address mod CACHE_LINE
ALIGN = 16

#: Raw buffers are received at the sender's address mod CACHE_LINE. The kernel's single-copy
#: transfer between ranks of a node (CMA, under MPICH and Open MPI) ran at about half speed
#: between buffers whose addresses differ mod 64: 9-10 GB/s against 16-18 GB/s at 16 MiB
#: (docs/benchmarks.md, "2026-12-06", finding 2). A numpy array of a few MiB starts 16 bytes
#: into its page, mpipub's pooled buffers at 0: every ``copy=False`` publication took the
#: slow copy.
CACHE_LINE = 64
LINE_BITS = 6

#: Publications whose raw buffers total at most this many bytes travel as one MPI message:
#: up to here one message carrying a copy beats a header plus a raw buffer; above it the raw
#: buffer's single-copy transfer wins (benchmark row 1i, `python -m mpipub.bench --only
#: inline`; docs/benchmarks.md, "Why the constants are what they are").
INLINE_LIMIT = 8 * 1024

# Message kinds.
DATA = 1  # engine -> client: a batch of publications (packing.py)
RESULT = 2  # engine -> client: a task's outcome (body: (ok, value or error info, t0, t1))
OUTPUT = 3  # engine -> client: printed text (step: 1 stdout, 2 stderr; body: str)
BYE = 4  # engine -> client: the engine stops serving
TASK = 5  # client -> engine: (kind of task, function, args, kwargs, options)
STOP = 6  # client -> engine: stop serving
ABORT = 7  # client -> engine: abort task_id


TYPE_CHECKING = False  # (no typing import at start-up)
if TYPE_CHECKING:
    from typing import Any, Callable


def _np():
    """numpy, imported on first use: a job that never sends an array does not pay for it
    (import time is most of an empty job's start-up on a small node)."""
    import numpy

    return numpy


def _empty(nbytes: int):
    """Uninitialised bytes to receive into (numpy: no zero-fill of large buffers)."""
    np = _np()
    return np.empty(nbytes, np.uint8)


def address(buf) -> int:
    """Where a contiguous buffer's first byte is in memory (an ndarray's without making a new
    array: every received buffer and every sent one asks)."""
    face = getattr(buf, "__array_interface__", None)
    if face is None:
        face = _np().frombuffer(buf, "u1").__array_interface__
    return face["data"][0]


def _line_offset(backing, nbytes: int, at: int) -> int:
    """Where in ``backing`` ``nbytes`` start at ``at`` mod CACHE_LINE (0 where there is no
    room for that)."""
    off = (at - address(backing)) % CACHE_LINE
    return off if off + nbytes <= memoryview(backing).nbytes else 0


def _empty_at(nbytes: int, at: int = 0):
    """Uninitialised bytes to receive into, starting at ``at`` mod CACHE_LINE."""
    raw = _empty(nbytes + CACHE_LINE)
    off = _line_offset(raw, nbytes, at)
    return raw[off:off + nbytes]


#: Pooled buffers of at least HUGE_MIN bytes are carved from 2 MiB-aligned memory that the
#: kernel may back with transparent huge pages (madvise; where THP is off nothing changes).
#: MPICH's single-copy receive walks both processes' pages, and runs far faster on huge
#: pages (docs/benchmarks.md, "Why the constants are what they are").
HUGE = 2 << 20
HUGE_MIN = 64 << 10


def _huge_pieces(nbytes: int) -> list:
    """Fresh buffers of ``nbytes`` sharing 2 MiB huge-page-aligned memory (as many as fit in
    one 2 MiB page, or one buffer over several); the memory goes back to the system when
    the last of them is gone (they are numpy views of one anonymous mapping)."""
    import mmap

    np = _np()
    if nbytes > HUGE // 2:
        count, size = 1, -(-nbytes // HUGE) * HUGE
    else:
        count, size = HUGE // nbytes, HUGE
    # A last page holding at most a cache line of the buffer (a receive backing's spare line,
    # RecvPool) stays on 4 KiB pages: only a buffer placed at an offset touches it, and then
    # it should take 4 KiB, not 2 MiB.
    advised = size - HUGE if 0 < nbytes % HUGE <= CACHE_LINE else size
    # private (a shared anonymous mapping would be shmem, which THP leaves alone); the part
    # outside [off, off + size) is never touched, so it never takes memory
    try:
        mm = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, OSError, ValueError):  # no such mapping here: plain memory
        return [_empty(nbytes)]
    base = np.frombuffer(mm, np.uint8)
    off = (-base.ctypes.data) % HUGE
    try:
        if advised:
            mm.madvise(mmap.MADV_HUGEPAGE, off, advised)
    except (AttributeError, OSError, ValueError):  # no THP here: ordinary pages
        pass
    return [base[off + i * nbytes: off + (i + 1) * nbytes] for i in range(count)]


def _pad(n: int) -> int:
    return (-n) % ALIGN


class Encoded:
    """A message ready to send: ``header`` plus out-of-band ``buffers`` (maybe empty);
    ``recycle``: pooled buffers to give back once the sends have completed."""

    __slots__ = ("header", "buffers", "nbytes", "recycle", "count")

    def __init__(self, header, buffers, nbytes, recycle=(), count=1):
        self.header = header
        self.buffers = buffers
        self.nbytes = nbytes
        self.recycle = recycle
        self.count = count  # publications it carries (the outbox bounds those)


def encode(
    kind: int,
    task_id: int,
    step: int,
    obj: Any,
    dumps: Callable = pickle.dumps,
    *,
    copy: bool = True,
    pool: BufferPool | None = None,
) -> Encoded:
    """Serialise ``obj``; with ``copy`` the result never aliases the caller's arrays.

    Raises whatever ``dumps`` raises: callers turn that into an error naming the culprit.
    """
    pbufs: list = []
    body = dumps(obj, protocol=5, buffer_callback=pbufs.append)
    raws = [pb.raw() for pb in pbufs]
    recycle: list = []
    if copy and sum(r.nbytes for r in raws) > INLINE_LIMIT:  # (inline: copied by frame)
        copies = []
        for r in raws:
            dst = pool.take(r.nbytes) if pool is not None else _empty(r.nbytes)
            memoryview(dst)[:] = r
            copies.append(dst)
        raws = recycle = copies
    return frame(kind, task_id, step, time.time(), body, raws, recycle=recycle)


def frame(kind: int, task_id: int, step: int, t: float, body, buffers: list, *,
          recycle=(), count: int = 1, payload: int = 0, last_t: float | None = None) -> Encoded:
    """Frame a pickled ``body`` and its raw ``buffers`` (sent as they are, no copy) into a
    message; buffers totalling at most ``INLINE_LIMIT`` bytes are copied into the header."""
    lens = [memoryview(b).nbytes for b in buffers]
    total = sum(lens)
    inline = total <= INLINE_LIMIT
    fixed = _FIXED.pack(MAGIC, kind, 1 if inline else 0, len(lens), task_id, step, t, len(body),
                        count, payload, t if last_t is None else last_t)
    if not inline:
        bufs_b = b"".join([_BUF.pack(n << LINE_BITS | address(b) % CACHE_LINE)
                           for b, n in zip(buffers, lens)])
        header = b"".join((fixed, bufs_b, body))
        return Encoded(header, buffers, len(header) + total, recycle, count)
    bufs_b = b"".join([_BUF.pack(n << LINE_BITS) for n in lens])
    parts = [fixed, bufs_b, body]
    off = len(fixed) + len(bufs_b) + len(body)
    for b, n in zip(buffers, lens):
        p = _pad(off)
        if p:
            parts.append(b"\0" * p)
        parts.append(b)
        off += p + n
    header = b"".join(parts)
    return Encoded(header, (), len(header), recycle, count)


class Message:
    """A received message: routing fields, the pickled body and its buffers (not yet decoded)."""

    __slots__ = ("source", "kind", "task_id", "step", "time", "count", "payload", "last_time",
                 "body", "buffers")

    def decode(self) -> Any:
        """Rebuild the payload (no copy of the buffers: arrays view the received memory)."""
        return pickle.loads(self.body, buffers=self.buffers)


def improbe(comm, source: int, tag: int, status):
    """A matched probe (``comm.improbe``) that sees a message already delivered: MPICH
    matches before it makes progress, so after a pause (an idle sleep) the first call misses
    a message that is there and only the second finds it (pip MPICH 5.0: always exactly two
    calls, tests/test_polling.py; with one probe per wake-up an idle engine saw a task one
    sleep late: docs/benchmarks.md, row 5). So a miss probes once more."""
    msg = comm.improbe(source, tag, status)
    if msg is None:
        msg = comm.improbe(source, tag, status)
    return msg


#: Largest raw buffer sent as one MPI message; larger ones travel as consecutive pieces. MPI
#: counts are C ints: Open MPI 5.0 refuses a count past 2**31 - 1 bytes (MPI_ERR_ARG) where
#: MPICH takes it (MPI-4 large counts), and so may a site's MPI.
MAX_PIECE = 1 << 30


def _pieces(buf) -> list:
    """Consecutive byte views of at most MAX_PIECE bytes covering a contiguous ``buf``."""
    mv = memoryview(buf).cast("B")
    return [mv[i : i + MAX_PIECE] for i in range(0, mv.nbytes, MAX_PIECE)]


def recv_message(comm, MPI, msg, status, buf_tag: int, alloc: Callable = _empty_at) -> Message:
    """Receive a matched header and the raw buffers that follow it from the same sender
    (into buffers from ``alloc(nbytes, at)``, ``at`` the sender's address mod CACHE_LINE)."""
    n = status.Get_count(MPI.BYTE)
    source = status.Get_source()
    header = bytearray(n)
    msg.Recv([header, MPI.BYTE])
    mv = memoryview(header)
    (magic, kind, inline, nbufs, task_id, step, t, bodylen, count, payload,
     last_t) = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise ValueError(f"rank {source} sent a message that is not mpipub's (bad magic byte)")
    off = _FIXED.size
    bufs_at = [_BUF.unpack_from(mv, off + 8 * i)[0] for i in range(nbufs)] if nbufs else ()
    off += 8 * nbufs
    m = Message()
    m.source, m.kind, m.task_id, m.step, m.time = source, kind, task_id, step, t
    m.count, m.payload, m.last_time = count, payload, last_t
    m.body = mv[off : off + bodylen]
    off += bodylen
    bufs = []
    if inline:
        for e in bufs_at:
            nb = e >> LINE_BITS
            off += _pad(off)
            bufs.append(mv[off : off + nb])
            off += nb
    else:
        for e in bufs_at:
            nb = e >> LINE_BITS
            b = alloc(nb, e & (CACHE_LINE - 1))
            if nb <= MAX_PIECE:
                comm.Recv([b, MPI.BYTE], source=source, tag=buf_tag)
            else:  # in the pieces the sender sent (in order: one sender, one tag)
                for piece in _pieces(b):
                    comm.Recv([piece, MPI.BYTE], source=source, tag=buf_tag)
            bufs.append(b)
    m.buffers = bufs
    return m


class BufferPool:
    """Send buffers recycled by size, so a simulation publishing the same shapes every step
    does not pay fresh-page faults for every copy (each costs several times the copy:
    docs/benchmarks.md, "Why the constants are what they are"). Holds at most ``max_bytes``
    idle; a buffer given back when the pool is full evicts buffers of other sizes, so a task
    publishing new shapes does not find the pool filled with a previous task's. Not
    thread-safe: the engine's sender lock guards it.
    """

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self.idle_bytes = 0
        self._free: dict[int, list] = collections.defaultdict(list)

    def take(self, nbytes: int):
        lst = self._free.get(nbytes)
        if lst:
            self.idle_bytes -= nbytes
            return lst.pop()
        if nbytes < HUGE_MIN:
            return _empty(nbytes)
        first, *more = _huge_pieces(nbytes)
        for b in more:  # the rest of the page waits here for the next takes of this size
            self.give(b)
        return first

    def give(self, buf) -> None:
        n = buf.nbytes
        if n < 4096 or n > self.max_bytes:
            return
        if self.idle_bytes + n > self.max_bytes:
            for size in sorted(self._free, reverse=True):
                lst = self._free[size]
                while lst and size != n and self.idle_bytes + n > self.max_bytes:
                    lst.pop()
                    self.idle_bytes -= size
            if self.idle_bytes + n > self.max_bytes:
                return
        self._free[n].append(buf)
        self.idle_bytes += n


class RecvPool:
    """Receive buffers on rank 0, reused once nothing references what was received into them.

    Every array the client hands out views a received buffer, and ``ar.data``, ``stream()``
    history and the sink keep them for a while, so each message would land in fresh memory,
    where page faults cost more than the copy itself (docs/benchmarks.md). So the pool keeps
    *backing* memory (in a ``BufferPool``, by size class: 64 KiB steps up to 2 MiB, then 1 MiB
    steps with a spare cache line, see ``take``) and lends a fresh ndarray over it
    (``np.frombuffer`` of a memoryview, so every array numpy derives from it keeps exactly
    that ndarray as its base).
    A weak reference to the lent ndarray queues the backing for reuse when the last array
    made from it is gone. That callback runs in whichever thread drops the last reference,
    possibly in the middle of ``take`` (an allocation there can run the garbage collector),
    so it only appends to a deque; ``take``, called by the I/O thread alone, moves the queue
    into the pool.
    """

    def __init__(self, max_idle: int = 256 << 20):
        import weakref

        self.backings = BufferPool(max_idle)
        self._lent: dict = {}  # id of a weak reference to a lent array -> (reference, backing)
        self._returned_backings: collections.deque = collections.deque()
        self._ref = weakref.ref

    @staticmethod
    def size_class(n: int) -> int:
        step = (64 << 10) if n <= (2 << 20) else (1 << 20)
        return -(-n // step) * step

    def take(self, nbytes: int, at: int = 0):
        """An array of ``nbytes`` starting at ``at`` mod CACHE_LINE (the sender's offset)."""
        returned = self._returned_backings
        while returned:
            self.backings.give(returned.popleft())
        # Above 2 MiB every backing has a cache line to spare, so that a buffer at an offset
        # takes the same size class as one at 0: copy and zero-copy publications of a size
        # (zero-copy starts at 4 MiB) reuse the same memory instead of each mapping fresh
        # pages. The spare line lies on 4 KiB pages where it would start a huge page of its
        # own (_huge_pieces), and only a buffer at an offset touches it. Below, where buffers
        # arrive at offset 0 but for rare ones, an offset takes the next class: a spare line
        # there would halve how many backings share a 2 MiB page.
        cls = self.size_class(nbytes)
        if cls > HUGE:
            cls += CACHE_LINE
        elif at:
            cls = self.size_class(nbytes + CACHE_LINE)
        backing = self.backings.take(cls)
        np = _np()
        lent = np.frombuffer(memoryview(backing), np.uint8, nbytes,
                             _line_offset(backing, nbytes, at))
        ref = self._ref(lent, self._returned)  # (arrays are unhashable: key by the ref's id)
        self._lent[id(ref)] = (ref, backing)
        return lent

    def _returned(self, ref) -> None:
        lent = self._lent.pop(id(ref), None)
        if lent is not None:
            self._returned_backings.append(lent[1])


#: Waiting for a send at the bound (or at the end of a task) polls with a sleep that doubles
#: from WAIT_MIN_S to WAIT_MAX_S (seconds) instead of spinning inside MPI (a yield-spin first
#: made no difference beyond the noise, and spinning ranks starve rank 0 when oversubscribed).
WAIT_MIN_S = 20e-6
WAIT_MAX_S = 1e-3


class Outbox:
    """Non-blocking sends with a bound on what is outstanding (bytes and count, or two
    messages, whichever is more).

    Every ``send`` first tests the oldest requests (so large rendezvous sends progress); when
    the bound is reached it waits for the oldest, which slows the producer instead of growing
    memory or dropping anything.
    """

    def __init__(self, comm, MPI, *, max_bytes: int = 512 << 20, max_count: int = 1024,
                 pool: BufferPool | None = None):
        self.comm = comm
        self.MPI = MPI
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.pool = pool
        self._pending: collections.deque = collections.deque()  # (requests, nbytes, count, keep)
        self.outstanding_bytes = 0
        self.outstanding_count = 0  # publications (or messages) not yet completed
        self.waited_s = 0.0  # time spent waiting at the bound (back-pressure)

    def send(self, enc: Encoded, dest: int, tag_head: int, tag_buf: int) -> None:
        """Post the sends for ``enc``; first wait for old sends while over the bound.

        Callers call ``progress()`` before copying into pooled buffers (the engine's sender
        does at the start of each batch), so finished sends' buffers are back in the pool."""
        MPI = self.MPI
        # Two messages may always be in flight, whatever their size (double buffering): the
        # next transfer is queued at rank 0 when the last ends, instead of starting only once
        # this engine has seen it end (docs/benchmarks.md, wire `Outbox`).
        while len(self._pending) >= 2 and (
            self.outstanding_bytes + enc.nbytes > self.max_bytes
            or self.outstanding_count + enc.count > self.max_count
        ):
            t0 = time.perf_counter()
            self._complete_oldest()
            self.waited_s += time.perf_counter() - t0
        # (Header first. The buffers first, so that rank 0, having matched a header, never
        # spins in Recv until this process runs again, measured slower: docs/benchmarks.md.)
        reqs = [self.comm.Isend([enc.header, MPI.BYTE], dest, tag_head)]
        for b in enc.buffers:
            if memoryview(b).nbytes <= MAX_PIECE:
                reqs.append(self.comm.Isend([b, MPI.BYTE], dest, tag_buf))
            else:
                reqs += [self.comm.Isend([p, MPI.BYTE], dest, tag_buf) for p in _pieces(b)]
        # the buffers stay referenced until the sends complete (MPI reads them until then)
        self._pending.append((reqs, enc.nbytes, enc.count, (enc.buffers, enc.recycle)))
        self.outstanding_bytes += enc.nbytes
        self.outstanding_count += enc.count

    def progress(self) -> None:
        """Retire every completed send at the front of the queue."""
        MPI = self.MPI
        while self._pending:
            reqs = self._pending[0][0]
            if not MPI.Request.Testall(reqs):
                return
            self._retire()

    def _complete_oldest(self) -> None:
        # Test and sleep instead of MPI_Waitall: a blocking MPICH wait spins a whole core,
        # which on an oversubscribed node starves rank 0, the very receiver we wait for.
        # While the transfer may still be running (nbytes at ~5 GB/s, twice over) the sleep
        # stays under a tenth of it, so a large send is seen done soon after it is; or, when
        # sends queued behind it keep rank 0 busy, under half the time they take: waking late
        # then costs nothing, and fewer wake-ups leave the cores to rank 0 (docs/benchmarks.md,
        # wire `Outbox`).
        reqs, nbytes = self._pending[0][0], self._pending[0][1]
        testall = self.MPI.Request.Testall
        if not testall(reqs):
            expected = nbytes / 5e9
            behind = (self.outstanding_bytes - nbytes) / 5e9
            cap = min(WAIT_MAX_S, max(WAIT_MIN_S, 0.1 * expected, 0.5 * behind))
            backoff, waited = Backoff(WAIT_MIN_S, 2.0, cap), 0.0
            while not testall(reqs):
                sleep = backoff.next()
                time.sleep(sleep)
                waited += sleep
                if waited >= 2 * expected:
                    backoff.longest = WAIT_MAX_S  # (the transfer should be done by now)
        self._retire()

    def _retire(self) -> None:
        _, nbytes, count, (_, recycle) = self._pending.popleft()
        self.outstanding_bytes -= nbytes
        self.outstanding_count -= count
        if self.pool is not None:
            for b in recycle:
                self.pool.give(b)

    def flush(self) -> None:
        """Wait until every send has completed."""
        while self._pending:
            self._complete_oldest()

    def __len__(self) -> int:
        return len(self._pending)


def cloudpickle():
    """cloudpickle, which tasks and results travel with (functions from ``__main__`` and
    notebook cells go by value), imported on first use: start-up stays light on every rank."""
    import cloudpickle

    return cloudpickle
