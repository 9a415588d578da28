"""Functions the benchmark workers send to engines (importable, so they travel by reference).

Each has a raw mpi4py twin that moves the same bytes to rank 0 on COMM_WORLD (never on mpipub's
own communicator), so baseline and mpipub run in the same job, with the same dispatch.
"""

from __future__ import annotations

import collections
import inspect
import os
import random
import time

import numpy as np
from mpi4py import MPI

from mpipub import publish_data
from mpipub.engine import loop as _engine
from mpipub.engine.contract import BATCH_BYTES

TAG = 77  # raw baseline traffic, on COMM_WORLD

#: the engines' default send bounds (engine.Engine): raw senders use the same window
WINDOW_COUNT = getattr(_engine, "MAX_OUTSTANDING_COUNT", 1024)
WINDOW_BYTES = getattr(_engine, "MAX_OUTSTANDING_BYTES", 512 << 20)

_arrays: dict = {}


def array(nbytes: int) -> np.ndarray:
    """A float64 array of ``nbytes``, made once per size (pages touched) and reused."""
    a = _arrays.get(nbytes)
    if a is None:
        a = np.arange(max(1, nbytes // 8), dtype=np.float64)
        _arrays[nbytes] = a
    return a


def wait_at_gate(params: dict) -> None:
    """Rank 0 of a worker job, right before its timed part: when the bench driver passed a
    gate, say we are ready and wait until it says go (bench/__main__.run_cmd)."""
    gate = params.get("gate")
    if not gate:
        return
    open(gate + ".ready", "w").close()
    t0 = time.monotonic()
    while not os.path.exists(gate + ".go"):
        if time.monotonic() - t0 > 120:
            raise RuntimeError("the bench driver never opened the gate")
        time.sleep(0.001)


def _test_sleep(req) -> None:
    while not req.Test():
        time.sleep(20e-6)


def window(nbytes: int) -> int:
    """Sends a raw sender keeps in flight: the engines' outbox bound (bytes and count, but
    always two messages, as wire.Outbox allows)."""
    return max(2, min(WINDOW_COUNT, WINDOW_BYTES // max(1, nbytes)))


# -- row 1 / 8: streams of arrays -------------------------------------------------------------
_send_copies: dict = {}


def raw_stream(nmsg: int, nbytes: int, polite: bool = False, copy: bool = False) -> None:
    """``Isend`` the same array ``nmsg`` times, at most ``window`` in flight. ``polite``: wait
    for a send by testing and sleeping, as mpipub's engines do, instead of ``MPI_Wait``
    (which spins a core in MPICH). ``copy``: copy the array into one of ``window``
    preallocated send buffers first, as ``publish_data``'s copy semantics make mpipub do
    (the same work as mpipub's engine: one copy per step, then the send)."""
    comm = MPI.COMM_WORLD
    a = array(nbytes)
    w = window(nbytes)
    reqs: collections.deque = collections.deque()
    if copy:
        bufs = _send_copies.get(nbytes)
        if bufs is None:
            _send_copies.clear()
            bufs = _send_copies[nbytes] = [a.copy() for _ in range(w)]
        k = 0
        for _ in range(nmsg):
            if len(reqs) >= w:
                reqs.popleft().Wait() if not polite else _test_sleep(reqs.popleft())
            b = bufs[k]
            k = k + 1 if k + 1 < w else 0
            np.copyto(b, a)
            reqs.append(comm.Isend([b, MPI.BYTE], 0, TAG))
        while reqs:
            reqs.popleft().Wait()
        return

    def wait(req) -> None:
        if polite:
            while not req.Test():
                time.sleep(20e-6)
        else:
            req.Wait()

    for _ in range(nmsg):
        if len(reqs) >= w:
            wait(reqs.popleft())
        reqs.append(comm.Isend([a, MPI.BYTE], 0, TAG))
    while reqs:
        wait(reqs.popleft())


_batch_bufs: list = []


def batch_bytes(nbytes: int) -> int:
    """Bytes of one message of ``raw_batch_stream``: as many whole steps of ``nbytes`` as fit
    in BATCH_BYTES (an engine's batch), or one step where a step is larger."""
    return max(BATCH_BYTES // nbytes, 1) * nbytes


def batches(nmsg: int, nbytes: int) -> int:
    """Messages one ``raw_batch_stream(nmsg, nbytes)`` sends (the last may be short)."""
    return -(-nmsg // (batch_bytes(nbytes) // nbytes))


def raw_batch_stream(nmsg: int, nbytes: int) -> None:
    """The raw program that does what an engine does with copy semantics, done simply: copy
    each step into the free one of two preallocated ``batch_bytes`` send buffers (an
    engine's slab), ``Isend`` a buffer once full (so a message carries as many steps as
    mpipub's batch), wait by testing and sleeping for a buffer to come back. Rank 0 receives
    it with ``raw_recv`` (``batches`` messages of up to ``batch_bytes``)."""
    comm = MPI.COMM_WORLD
    src = array(nbytes).view(np.uint8)
    n = src.nbytes
    size = batch_bytes(n)
    if not _batch_bufs or _batch_bufs[0].nbytes < size:
        _batch_bufs[:] = [np.ones(size, np.uint8) for _ in range(2)]
    bufs = _batch_bufs
    reqs: list = [None, None]
    k = fill = 0
    for i in range(nmsg):
        if fill == 0 and reqs[k] is not None:
            _test_sleep(reqs[k])
        bufs[k][fill:fill + n] = src
        fill += n
        if fill + n > size or i == nmsg - 1:
            reqs[k] = comm.Isend([bufs[k][:fill], MPI.BYTE], 0, TAG)
            k ^= 1
            fill = 0
    for r in reqs:
        if r is not None:
            _test_sleep(r)


def pub_stream(nmsg: int, nbytes: int, *, copy: bool) -> None:
    """Publish the same array ``nmsg`` times (``copy``: publish_data's, keyword-only: the
    bench's copy and zero-copy rows were swapped until 2026-12-06 by a positional flag)."""
    a = array(nbytes)
    for _ in range(nmsg):
        publish_data({"a": a}, copy=copy)


def pub_keys(nsteps: int, nkeys: int) -> None:
    """Row 7k: every step publishes a dict of ``nkeys`` floats (k0, k1, ...)."""
    names = [f"k{i}" for i in range(nkeys)]
    for step in range(nsteps):
        publish_data({k: float(step + i) for i, k in enumerate(names)})


#: What rank 0 keeps by default for ``stream()`` (``Client(history_bytes=...)``): the size of
#: baseline (b)'s ring of receive buffers.
def history_bytes() -> int:
    """``Client``'s default ``history_bytes``, wherever the module that defines it lives
    (looked up on rank 0 only: engine ranks never import the client side)."""
    from mpipub import Client

    return inspect.signature(Client).parameters["history_bytes"].default

#: The three raw receivers rank 0 can run against the same senders (benchmarks/README.md):
#: (a) ``reuse``, the fastest simple receiver: matched probe + ``Recv`` into one reused buffer
#: (the ceiling for a receiver that keeps only the latest message; ``mprobe`` measured a little
#: faster than a plain ``Recv(ANY_SOURCE)``: 16.4 vs 15.0 GB/s at 64 KiB, issue 17);
#: (b) ``ring``, a receiver that keeps as many bytes as mpipub's default history: a ring of
#: preallocated buffers totalling ``history_bytes()`` (at least two), each message into the next;
#: (c) ``fresh``, a new ``np.empty`` per message (information: from ~1 MiB that is fresh pages).
RAW_RECEIVERS = ("reuse", "ring", "fresh")

_ring: dict = {}


def _ring_of(nbytes: int) -> list:
    """Baseline (b)'s ring for ``nbytes`` messages, made once per size (pages touched). Two
    sizes are kept, a case's steps and its batches (``batch_bytes``), so that modes that
    alternate between them make nothing while timed; an older size's ring is freed."""
    ring = _ring.get(nbytes)
    if ring is None:
        while len(_ring) >= 2:
            del _ring[next(iter(_ring))]
        k = max(2, history_bytes() // max(1, nbytes))
        ring = _ring[nbytes] = [np.ones(max(1, nbytes // 8)) for _ in range(k)]
    return ring


def raw_recv(total: int, nbytes: int, how: str = "reuse", last: dict | None = None) -> int:
    """Rank 0: matched probe + ``Recv`` of ``total`` messages of up to ``nbytes``, ``how`` one
    of RAW_RECEIVERS. ``last``, when given, gets each sender's last arrival time (time.time())."""
    comm = MPI.COMM_WORLD
    st = MPI.Status()
    nb = 0
    ring = _ring_of(nbytes) if how == "ring" else None
    one = array(nbytes).copy() if how == "reuse" else None
    k = 0
    for _ in range(total):
        msg = comm.mprobe(MPI.ANY_SOURCE, TAG, st)
        n = st.Get_count(MPI.BYTE)
        if ring is not None:
            buf = ring[k]
            k = k + 1 if k + 1 < len(ring) else 0
        elif one is not None:
            buf = one
        else:
            buf = np.empty(n // 8, np.float64)
        msg.Recv([buf, MPI.BYTE])
        nb += n
        if last is not None:
            last[st.Get_source()] = time.time()
    return nb


# -- row 2: small publications ----------------------------------------------------------------
_A20 = np.arange(20.0)


def raw_small(nmsg: int, kind: str) -> None:
    comm = MPI.COMM_WORLD
    reqs: collections.deque = collections.deque()
    a = _A20
    for i in range(nmsg):
        d = {"i": i} if kind == "i" else {"a": a, "i": i}
        if len(reqs) >= WINDOW_COUNT:
            reqs.popleft().wait()
        reqs.append(comm.isend(d, 0, TAG))
    while reqs:
        reqs.popleft().wait()


def pub_small(nmsg: int, kind: str) -> None:
    a = _A20
    for i in range(nmsg):
        publish_data({"i": i} if kind == "i" else {"a": a, "i": i})


def raw_recv_small(total: int) -> None:
    comm = MPI.COMM_WORLD
    for _ in range(total):
        comm.recv(source=MPI.ANY_SOURCE, tag=TAG)


# -- row 3: cost of one publish_data call -----------------------------------------------------
def pub_cost(nmsg: int, nbytes: int, gap_s: float) -> tuple[list, list]:
    """Alternate numpy.copyto (baseline) and publish_data of the same array, with a pause
    between steps like a simulation's compute phase. Returns both lists of call times."""
    a = array(nbytes)
    dst = np.empty_like(a)
    np.copyto(dst, a)
    tc, tp = [], []
    pc = time.perf_counter
    for _ in range(nmsg):
        t = pc()
        np.copyto(dst, a)
        tc.append(pc() - t)
        time.sleep(gap_s)
        t = pc()
        publish_data({"a": a})
        tp.append(pc() - t)
        time.sleep(gap_s)
    return tc, tp


# -- row 4: freshness ---------------------------------------------------------------------------
def fresh_pub(n: int, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(n):
        time.sleep(rng.uniform(0.005, 0.015))
        publish_data({"i": i})


def raw_ping(n: int) -> list:
    """Engine side of a ping-pong with rank 0 (8 bytes); returns round-trip times."""
    comm = MPI.COMM_WORLD
    b = np.zeros(1)
    rtt = []
    for _ in range(n):
        t = time.perf_counter()
        comm.Send([b, MPI.DOUBLE], 0, TAG)
        comm.Recv([b, MPI.DOUBLE], 0, TAG)
        rtt.append(time.perf_counter() - t)
    return rtt


def raw_pong(n: int, source: int) -> None:
    comm = MPI.COMM_WORLD
    b = np.zeros(1)
    for _ in range(n):
        comm.Recv([b, MPI.DOUBLE], source, TAG)
        comm.Send([b, MPI.DOUBLE], source, TAG)


# -- row 5: idle engines ------------------------------------------------------------------------
def cpu_now() -> tuple[float, float]:
    return time.process_time(), time.time()


def now() -> float:
    return time.time()


def blocked_cpu() -> tuple[float, float]:
    """Block in a raw MPI receive until rank 0 sends; return (cpu seconds, wall seconds)."""
    comm = MPI.COMM_WORLD
    b = np.zeros(1)
    c0, w0 = time.process_time(), time.time()
    comm.Recv([b, MPI.DOUBLE], 0, TAG)
    return time.process_time() - c0, time.time() - w0


def blocked_start(n: int) -> list:
    """Block in a raw receive n times; return the arrival times (time.time())."""
    comm = MPI.COMM_WORLD
    b = np.zeros(1)
    out = []
    for _ in range(n):
        comm.Recv([b, MPI.DOUBLE], 0, TAG)
        out.append(time.time())
    return out


# -- the inline threshold (wire.INLINE_LIMIT) ---------------------------------------------------
def pub_stream_limit(nmsg: int, nbytes: int, inline: bool) -> None:
    """One publication per message (the batch is posted after every call, as when an engine
    publishes now and then), with every message's payload forced inline (one MPI message)
    or split (header + raw buffer): where one message stops paying (wire.INLINE_LIMIT)."""
    from mpipub.engine.loop import current_engine
    from mpipub.transport import wire

    sender = current_engine().sender
    a = array(nbytes)
    old = wire.INLINE_LIMIT
    wire.INLINE_LIMIT = (1 << 40) if inline else -1
    try:
        for _ in range(nmsg):
            publish_data({"a": a})
            sender.post()
        sender.drain()
    finally:
        wire.INLINE_LIMIT = old
