"""The pools that send and receive buffers come from (wire.BufferPool, wire.RecvPool): buffers
carved from shared huge-page memory must never overlap, and memory goes back when unused.

No MPI here: these are the allocators alone (the MPI jobs in test_api use them end to end).
"""

from __future__ import annotations

import gc
import weakref

import numpy as np

from mpipub.transport import wire


def _span(a: np.ndarray) -> tuple[int, int]:
    start = a.__array_interface__["data"][0]
    return start, start + a.nbytes


def test_pooled_buffers_never_overlap_and_sit_on_huge_page_boundaries():
    pool = wire.BufferPool()
    sizes = [64 << 10, 192 << 10, 1 << 20, 3 << 20, 5000, (1 << 20) + 8]
    taken = [pool.take(n) for n in sizes for _ in range(5)]
    spans = sorted(_span(a) for a in taken)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, "two pooled buffers share memory"
    for i, a in enumerate(taken):
        a[:] = i % 251
    assert all(np.all(a == i % 251) for i, a in enumerate(taken))
    for a in taken:
        if a.nbytes >= wire.HUGE_MIN:
            assert a.nbytes in sizes and a.flags.writeable
    firsts = [pool.take(n) for n in (4 << 20, 2 << 20)]  # fresh pages: 2 MiB aligned
    assert all(_span(a)[0] % wire.HUGE == 0 for a in firsts)


def test_the_rest_of_a_page_is_pooled_and_its_memory_freed_with_the_last_buffer():
    pool = wire.BufferPool()
    a = pool.take(1 << 20)
    assert pool.idle_bytes == 1 << 20  # the page's other half waits in the pool
    b = pool.take(1 << 20)
    assert pool.idle_bytes == 0 and _span(b)[0] == _span(a)[1]
    page = weakref.ref(a.base)  # the array over the whole mapping (its pieces view it)
    del a
    gc.collect()
    assert page() is not None  # b still uses the page
    del b
    gc.collect()
    assert page() is None


def test_received_buffers_are_reused_only_when_nothing_views_them():
    pool = wire.RecvPool()
    first = pool.take(100_000)
    view = first[10:20]
    del first
    gc.collect()
    second = pool.take(100_000)
    view[:] = 7
    second[:] = 1
    assert np.all(view == 7)  # still its own memory
    del view, second
    gc.collect()
    third = pool.take(100_000)
    assert third.nbytes == 100_000


def test_received_buffers_start_at_the_senders_offset_in_a_cache_line():
    # the kernel's single-copy transfer runs at half speed between addresses that differ
    # mod 64 (wire.CACHE_LINE); buffers at an offset must still never overlap
    pool = wire.RecvPool()
    lent = []
    for n in (100_000, 1 << 20, (4 << 20) + 8):
        for at in (0, 8, 16, 40, 63):
            for take in (pool.take, wire._empty_at):
                b = take(n, at)
                assert b.nbytes == n and _span(b)[0] % wire.CACHE_LINE == at, (n, at, take)
                b[:] = at
                lent.append(b)
    spans = sorted(_span(b) for b in lent)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert all(np.all(b == b[0]) for b in lent)


def test_a_header_carries_each_buffers_length_and_offset_in_a_cache_line():
    base = np.arange(300_000, dtype=np.uint8)
    bufs = [base[5:100_005], base[64:200_064]]
    enc = wire.frame(wire.DATA, 1, 2, 0.0, b"body", bufs)
    off = wire._FIXED.size
    entries = [wire._BUF.unpack_from(enc.header, off + 8 * i)[0] for i in range(2)]
    assert [e >> wire.LINE_BITS for e in entries] == [100_000, 200_000]
    assert [e % wire.CACHE_LINE for e in entries] == [_span(b)[0] % 64 for b in bufs]


def test_a_buffer_at_an_offset_reuses_the_memory_of_one_that_was_not():
    # copy (offset 0) and zero-copy (a numpy array's offset) publications of one size share
    # rank 0's receive memory: a backing of its own size class each time was fresh pages
    pool = wire.RecvPool()
    for first, then in ((0, 16), (16, 0), (40, 8)):
        a = pool.take(16 << 20, first)
        backing = a.base.obj  # (the lent array views a memoryview of its backing)
        del a
        gc.collect()
        b = pool.take(16 << 20, then)
        assert b.base.obj is backing, (first, then)
        del b
        gc.collect()


def test_receive_buffers_of_a_mebibyte_still_share_a_huge_page():
    # the spare cache line is for sizes above 2 MiB only: two 1 MiB backings per 2 MiB page
    pool = wire.RecvPool()
    a, b = pool.take(1 << 20), pool.take(1 << 20)
    assert abs(_span(a)[0] - _span(b)[0]) == 1 << 20
