"""The C publish path (mpipub/engine/_fastpub.c) packs exactly what Batch.add packs, and
leaves everything it does not handle to the Python path, with nothing changed.

The first tests drive it in this process (no MPI: they check packing, byte for byte); the
last runs real engines both ways, with the C path and with MPIPUB_PURE_PYTHON=1."""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ok
from mpipub.engine import batch, contract, sender
from mpipub.sink import layout, rules
from mpipub.transport import packing, wire

fastpub = batch.fastpub
needs_c = pytest.mark.skipif(fastpub is None, reason="the C path is off here (_fastpub not "
                             "built, or MPIPUB_PURE_PYTHON=1)")


def test_the_c_path_is_built_where_it_is_required():
    """Where the extension must be built (MPIPUB_REQUIRE_FASTPUB=1, as .ci/run sets), its
    absence fails here instead of the equivalence tests below skipping; MPIPUB_PURE_PYTHON=1
    turns the C path off (publish_data is then the Python function)."""
    from mpipub import config, publish_data

    if os.environ.get("MPIPUB_REQUIRE_FASTPUB") == "1":
        try:
            importlib.import_module("mpipub.engine._fastpub")
        except ImportError as exc:
            pytest.fail(f"MPIPUB_REQUIRE_FASTPUB=1 but mpipub.engine._fastpub is not built: {exc}")
    if config.get("MPIPUB_PURE_PYTHON"):
        assert fastpub is None and type(publish_data).__name__ == "function", publish_data
    elif fastpub is None:
        pytest.skip("mpipub.engine._fastpub is not built here")
    else:
        assert isinstance(publish_data, fastpub.Publisher), publish_data


class _Sub(np.ndarray):
    pass


@pytest.fixture
def configured(monkeypatch):
    """_fastpub as an engine has it (the contract read at import), but batches never seal by
    age (the tests compare whole batches; a slow moment must not split one)."""
    monkeypatch.setattr(contract, "MAX_AGE_S", math.inf)
    if fastpub is not None:  # (without the C path only the Python side is tested)
        fastpub.read_contract()
    yield
    monkeypatch.undo()
    if fastpub is not None:
        fastpub.read_contract()


class _Sender(fastpub.SenderBase if fastpub is not None else object):  # type: ignore[misc]
    """A sender with the C path's fields and no flusher or MPI: the test plays the flusher."""

    def __init__(self):
        self.pool = wire.BufferPool()
        self.lock = threading.Lock()
        self.wake = threading.Lock()
        self.wake.acquire()
        self.batch = None
        self.batch_type = batch.Batch
        self.sealed = []
        self.ready_slab = self.pool.take(batch.SLAB_BYTES)
        self.task_id = 7
        self.check_value = None
        self.error = None
        self._lock_acquire, self._lock_release = self.lock.acquire, self.lock.release
        self._wake_release = self.wake.release
        self.step = 0
        self.last_add = 0.0
        self.wakes_at = -math.inf  # on a short timer: never woken
        self.next_abort_poll = math.inf
        self.posted = 0

    def _post_sealed(self):
        self.posted += len(self.sealed)
        self.sealed = []

    def python_add(self, data):
        """What the Python path does with a publication (sender.Sender.add)."""
        if self.batch is None:
            self.batch = batch.Batch(self.task_id, self.pool)
        self.batch.add(self.step, time.time(), data, True)
        self.step += 1

    def state(self):
        b = self.batch
        return (b, self.step, self.ready_slab, self.last_add, len(self.sealed),
                None if b is None else (len(b.pubs), b.nbytes, b._slab_off, len(b._bufs)))


def _slab_bytes(batch, entry):
    _, code, dts, shape, count, bi, off = entry
    n = count * np.dtype(dts).itemsize
    return bytes(memoryview(batch._bufs[bi] if bi != batch._slab_index else batch._slab)
                 [off:off + n])


def _assert_same(fast, ref):
    """Same publications, entries and array bytes (times aside: each path reads the clock)."""
    assert len(fast.pubs) == len(ref.pubs)
    for (s1, t1, n1, e1), (s2, t2, n2, e2) in zip(fast.pubs, ref.pubs):
        assert (s1, n1, e1) == (s2, n2, e2)
        assert isinstance(t1, float) and t1 > 0 and type(t2) is type(t1)  # time.time() floats
        for e_fast, e_ref in zip(e1, e2):
            if e_fast[1] == packing.ARRAY:
                assert _slab_bytes(fast, e_fast) == _slab_bytes(ref, e_ref)
    assert (fast.nbytes, fast._slab_off, fast._slab_index) == \
        (ref.nbytes, ref._slab_off, ref._slab_index)


PLAIN = [
    # an array too big for a slab gets its own buffer, in dict order (buffer indices match)
    {"own": np.arange(batch.SLAB_ITEM_MAX // 8 + 1.0), "a": np.arange(20.0), "i": 0},
    {"x": np.arange(12, dtype=np.int8).reshape(3, 4), "s": "text", "b": b"\x00\x01",
     "n": None, "flag": True, "c": 1 + 2j, "f": 0.5},
    {"f32": np.ones((2, 3, 4), np.float32), "u2": np.arange(5, dtype=np.uint16)},
    {"odd": np.array([True, False, True]), "after": np.arange(3, dtype=np.int64)},  # alignment
    {"zero_d": np.array(3.5)},
    {},
    {"full": np.ones(batch.SLAB_ITEM_MAX // 8)},  # the largest array a slab takes
    {"batch": np.arange(sender.BATCH_BYTES // 8, dtype=np.int64), "after": np.ones(2)},
]


def test_a_batch_of_1_mib_arrays_is_one_buffer_on_both_paths(configured):
    # Rank 0's one I/O thread pays per message and per buffer, so arrays up to 1 MiB share a
    # slab and four of them travel as one header and one buffer (docs/benchmarks.md,
    # "Closing the distance to (a)"): with 1 MiB slabs each was a message of its own.
    a = np.arange(1 << 17, dtype=np.float64)  # 1 MiB
    ref = batch.Batch(7, wire.BufferPool())
    for k in range(4):
        ref.add(k, 0.0, {"a": a + k}, True)
    assert ref.nbytes >= sender.BATCH_BYTES and len(ref.buffers()) == 1
    if fastpub is None:
        return
    s = _Sender()
    for k in range(4):
        assert s.fast_add({"a": a + k}) is True
    b, = s.sealed  # the fourth filled it
    assert [bytes(x) for x in b.buffers()] == [bytes(x) for x in ref.buffers()]


@needs_c
def test_plain_publications_are_packed_exactly_as_the_python_path_packs_them(configured):
    s, ref_pool = _Sender(), wire.BufferPool()
    ref = batch.Batch(7, ref_pool)
    for step, data in enumerate(PLAIN):
        ref.add(step, time.time(), data, True)  # (also caches each dtype as plain)
        assert s.fast_add(data) is True, data
    b, = s.sealed  # the last one filled it (BATCH_BYTES)
    assert s.batch is None and s.step == len(PLAIN) and s.ready_slab is None and b.task_id == 7
    _assert_same(b, ref)
    # what goes on the wire is the same too
    assert [bytes(x) for x in b.buffers()] == [bytes(x) for x in ref.buffers()]


NOT_PLAIN = {
    "strided": {"a": np.arange(10.0)[::2]},
    "fortran order": {"a": np.asfortranarray(np.ones((3, 4)))},
    "object dtype": {"a": np.array([1, "x"], dtype=object)},
    "record dtype": {"a": np.zeros(2, dtype=[("x", "f4"), ("y", "i2")])},
    "a list": {"i": 1, "a": [1, 2]},
    "a numpy scalar": {"a": np.float64(1.0)},
    "a key that is not str": {1: 2},
    "an ndarray subclass": {"a": np.arange(3.0).view(_Sub)},
    "an empty array": {"a": np.zeros(0)},
    "not a dict": OrderedDict(a=np.ones(3)),
    "too many keys": {f"k{i}": i for i in range(40)},
}


@needs_c
@pytest.mark.parametrize("what", list(NOT_PLAIN))
def test_what_the_c_path_does_not_handle_is_left_to_python_untouched(configured, what):
    s = _Sender()
    for data in NOT_PLAIN.values():  # every dtype seen once (the dtype cache is Python's)
        b = batch.Batch(1, wire.BufferPool())
        try:
            b.add(0, 0.0, data, True)
        except Exception:  # noqa: BLE001
            pass
    for opened in (False, True):
        if opened:
            assert s.fast_add({"i": 1}) is True
        before = s.state()
        assert s.fast_add(NOT_PLAIN[what]) is False
        assert s.state() == before


@needs_c
def test_the_c_path_steps_aside_when_it_must(configured):
    s = _Sender()
    a = np.ones(100)
    batch.Batch(1, wire.BufferPool()).add(0, 0.0, {"a": a}, True)
    before = s.state()
    with s.lock:  # the flusher holds the lock: the Python path waits for it
        assert s.fast_add({"a": a}) is False
    s.task_id = None  # no task running
    assert s.fast_add({"a": a}) is False
    s.task_id, s.error = 7, RuntimeError("flusher died")  # the Python path raises it
    assert s.fast_add({"a": a}) is False
    s.error, s.next_abort_poll = None, 0.0  # an abort poll is due (Python reads aborts)
    assert s.fast_add({"a": a}) is False
    s.next_abort_poll = math.inf  # copy=False from ZERO_COPY_MIN: sent from the array itself
    big = np.ones(batch.ZERO_COPY_MIN // 8)
    assert s.fast_add({"big": big}, False) is False
    s.ready_slab = None  # no slab to open a batch with
    assert s.fast_add({"a": a}) is False
    assert s.state() == (before[0], before[1], None, *before[3:])
    assert s.fast_add({"i": 1}) is True  # no array: no slab needed
    assert s.fast_add({"big": big}) is True  # copied into a buffer of its own
    assert len(s.sealed) == 1  # (it filled the batch)
    s.sealed = []
    half = big[:len(big) // 2]
    assert s.fast_add({"half": half}, False) is True  # copied, below ZERO_COPY_MIN
    s.sealed = []
    b = batch.Batch(7, s.pool)
    b.add(0, 0.0, {"half": half}, False)
    assert not np.shares_memory(b._bufs[0], half)  # as the Python path does


@needs_c
def test_publish_data_is_the_c_path_first_and_the_python_function_for_the_rest(configured):
    """The public publish_data (a _fastpub.Publisher): plain data through the current sender's
    C path, everything else (and every call while no task runs) to the Python function, with
    the caller's arguments as given; it looks and pickles like that function."""
    import inspect
    import pickle

    import cloudpickle

    from mpipub import publish_data
    from mpipub.engine import datapub

    assert isinstance(publish_data, fastpub.Publisher) and publish_data is datapub.publish_data
    py = publish_data.fallback
    assert inspect.signature(publish_data) == inspect.signature(py)
    assert publish_data.__name__ == "publish_data" and publish_data.__doc__ == py.__doc__
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        assert loads(dumps(publish_data)) is publish_data  # (by reference, as a function)

    calls = []
    pub = fastpub.Publisher(lambda *a, **kw: calls.append((a, kw)) or "python")
    s = _Sender()
    a = np.ones(100)
    batch.Batch(1, wire.BufferPool()).add(0, 0.0, {"a": a}, True)  # (dtype cache)
    assert pub({"a": a}) == "python" and s.step == 0  # no current sender: Python's
    assert calls == [(({"a": a},), {})]
    calls.clear()
    engine = SimpleNamespace(sender=s)
    fastpub.set_current(engine)
    try:
        assert fastpub.current() is engine
        assert pub({"a": a}) is None and pub({"a": a}, copy=True) is None
        assert s.step == 2 and len(s.batch.pubs) == 2 and not calls  # taken by C
        big = np.ones(batch.ZERO_COPY_MIN // 8)
        for args, kw in [(({"a": [1]},), {}),  # not plain
                         (({"big": big},), {"copy": False}),  # zero-copy is Python's
                         (({"a": a},), {"copy": True, "other": 1}),  # Python's TypeError
                         ((), {"data": {"a": a}}), (({"a": a}, False), {})]:
            calls.clear()
            assert pub(*args, **kw) == "python" and calls == [(args, kw)], (args, kw)
        assert s.step == 2
        with pytest.raises(TypeError):
            fastpub.set_current(SimpleNamespace(sender=object()))
    finally:
        fastpub.set_current(None)
    assert fastpub.current() is None and pub({"a": a}) == "python"


@needs_c
def test_c_and_python_publications_share_one_batch_and_slab(configured):
    s, ref = _Sender(), batch.Batch(7, wire.BufferPool())
    # four arrays fill a slab (with their padding) but not a batch (BATCH_BYTES)
    quarter = np.arange(batch.SLAB_ITEM_MAX // 8 - 1, dtype=np.float64)
    for k in range(6):
        ref.add(k, 0.0, {"a": quarter + k}, True)
        if s.fast_add({"a": quarter + k}) is False:
            assert k == 4  # the slab is full: Python starts the next one
            s.python_add({"a": quarter + k})
    b = s.sealed[0]  # sealed by the sixth: past BATCH_BYTES
    assert s.batch is None and b._slab_index == 1 and len(b._bufs) == 2
    _assert_same(b, ref)


@needs_c
def test_the_c_path_seals_full_batches_and_wakes_only_an_idle_flusher(configured):
    s = _Sender()
    s.wakes_at = math.inf  # idle, no timeout: the first publication of a batch wakes it
    assert s.fast_add({"i": 0}) is True
    assert s.wake.acquire(blocking=False) and s.wakes_at == -math.inf
    s.wakes_at = time.time() + 60  # asleep until a step far off: woken too
    s.batch = None
    assert s.fast_add({"i": 0}) is True
    assert s.wake.acquire(blocking=False)
    s.batch = None
    s.wakes_at = time.time() + sender.WAKE_SLACK_S / 10  # it looks by itself very soon
    assert s.fast_add({"i": 0}) is True
    assert not s.wake.acquire(blocking=False)
    s.batch = None
    for i in range(sender.BATCH_PUBS):
        assert s.fast_add({"i": i}) is True
    assert s.batch is None and len(s.sealed) == 1 and len(s.sealed[0].pubs) == sender.BATCH_PUBS
    # the flusher has not posted it: the C path fills the next batch, but the call that
    # would seal that one too is the Python path's (it posts both, with signals deferred)
    for i in range(sender.BATCH_PUBS - 1):
        assert s.fast_add({"i": i}) is True
    before = s.state()
    assert s.fast_add({"i": 0}) is False and s.state() == before and s.posted == 0
    s.sealed = []  # posted
    assert s.fast_add({"i": 0}) is True and len(s.sealed) == 1


SINK_VALUES = [
    1, -(1 << 63), (1 << 63) - 1, 1 << 63, -(1 << 63) - 1, True, 1.5, 1j, b"x\x00", "text",
    "nul\x00inside", "\udc80", None,
    np.arange(3, dtype=np.int8), np.ones((2, 2), np.float32), np.array([1j]),
    np.array([True]), np.array([b"ab"]), np.array(["ab"]), np.array([1], "datetime64[s]"),
    np.zeros(1, "V8"), np.arange(2, dtype=">u2"),
]


@needs_c
@pytest.mark.parametrize("value", SINK_VALUES, ids=repr)
def test_with_a_sink_the_c_path_takes_only_what_the_sink_accepts(configured, value):
    s = _Sender()
    s.check_value = layout.check_value
    batch.Batch(1, wire.BufferPool()).add(0, 0.0, {"v": value}, True)  # (dtype cache)
    before = s.state()
    taken = s.fast_add({"v": value})
    if layout.check_value("v", value) is not None:
        assert taken is False and s.state() == before  # Python raises the sink's error
    else:
        ok_for_c = not isinstance(value, np.ndarray) or value.dtype.kind in rules.ARRAY_KINDS
        assert taken is ok_for_c


@needs_c
def test_the_c_path_reads_its_constants_and_accepted_values_from_the_contract(configured,
                                                                             monkeypatch):
    """One declaration (contract.py, sink/rules.py): a constant or an accepted value changed
    there changes what the C path does, and the sink's Python check with it."""
    s = _Sender()
    monkeypatch.setattr(contract, "BATCH_PUBS", 3)
    fastpub.read_contract()
    for i in range(3):
        assert s.fast_add({"i": i}) is True
    assert len(s.sealed) == 1 and len(s.sealed[0].pubs) == 3  # sealed at the contract's 3
    s.sealed, s.batch = [], None
    ints = np.arange(3, dtype=np.int32)
    batch.Batch(1, wire.BufferPool()).add(0, 0.0, {"v": ints}, True)  # (dtype cache)
    s.check_value = layout.check_value  # a sink is on
    assert s.fast_add({"v": ints}) is True and layout.check_value("v", ints) is None
    monkeypatch.setattr(rules, "ARRAY_KINDS", "f")
    monkeypatch.setattr(rules, "STR_FORBIDDEN", "\0#")
    fastpub.read_contract()
    before = s.state()
    assert s.fast_add({"v": ints}) is False and s.state() == before  # Python's check decides
    assert "cannot be stored" in layout.check_value("v", ints)
    assert s.fast_add({"s": "a#b"}) is False and layout.check_value("s", "a#b")
    assert s.fast_add({"s": "ab"}) is True and layout.check_value("s", "ab") is None


@needs_c
def test_c_fields_that_differ_from_the_contract_stop_the_import(tmp_path):
    """_fastpub's structs must have exactly the contract's fields: one removed from (or added
    to) contract.py and not to _fastpub.c makes the import fail, naming the field, instead of
    the C path writing where Python does not read."""
    code = ("import mpipub.engine.contract as c\n"
            "c.SENDER_FIELDS = tuple(f for f in c.SENDER_FIELDS if f[0] != 'check_value')\n"
            "import mpipub.engine._fastpub\n")
    job = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "MPIPUB_PURE_PYTHON": "0"})
    assert job.returncode != 0, job.stdout
    assert "RuntimeError: mpipub.engine._fastpub does not match mpipub/engine/contract.py: " \
           "SenderBase's field 5 is check_value object in C but error object in " \
           "SENDER_FIELDS" in job.stderr, job.stderr


def test_the_python_batch_has_the_contracts_fields():
    from mpipub.engine.batch import _BatchFields

    assert _BatchFields.__slots__ == tuple(name for name, _ in contract.BATCH_FIELDS)
    b = _BatchFields(3, wire.BufferPool())
    assert all(hasattr(b, name) for name in _BatchFields.__slots__)


@pytest.mark.parametrize("pure", ["0", "1"])
def test_engines_publish_the_same_with_and_without_the_c_path(mpi_script, pure):
    job = mpi_script("""
        import numpy as np
        from mpipub import Client
        c = Client(history_bytes=1 << 30)
        def mixed(steps):
            import time
            import numpy as np
            from mpipub.engine import loop as engine
            from mpipub import publish_data
            a = np.zeros(1000)
            m = np.zeros((3, 4), np.int16)
            fast_seen = False
            for i in range(steps):
                a[:] = i
                m[:] = i
                d = {"a": a, "m": m, "i": i}
                if i % 7 == 3:
                    d["lst"] = [i]  # pickled: the Python path takes this one
                if i % 11 == 5:
                    d["big"] = np.full(40_000, i)  # its own buffer: Python path
                publish_data(d)
                a[:] = -1  # changed right after the call returns
                m[:] = -1
                fast_seen |= engine.fast_path_on()
                if i % 50 == 49:
                    time.sleep(0.01)  # the flusher goes idle, then expects the next step
            return fast_seen
        steps = 300
        ar = c[:].apply_async(mixed, steps)
        seen = {}
        for p in ar.stream(timeout=60):
            i = p.data["i"]
            assert p.step == i, (p.engine, p.step, i)
            assert (p.data["a"] == i).all() and (p.data["m"] == i).all(), (p.engine, i)
            assert p.data["m"].shape == (3, 4) and p.data["m"].dtype == np.int16
            assert ("lst" in p.data) == (i % 7 == 3) and ("big" in p.data) == (i % 11 == 5)
            if "big" in p.data:
                assert (p.data["big"] == i).all()
            seen.setdefault(p.engine, []).append(i)
        fast = ar.get(timeout=60)
        assert seen == {1: list(range(steps)), 2: list(range(steps))}, seen
        assert ar.data[0]["i"] == steps - 1 and ar.data[0]["lst"] == [297]
        print("FAST", fast)
    """, nranks=3, timeout=120, env={"MPIPUB_PURE_PYTHON": pure})
    ok(job, "FAST")
    used = job.stdout.split("FAST ")[1].splitlines()[0]
    if pure == "1":
        assert used == "[False, False]", job.stdout
    elif fastpub is not None:
        assert used == "[True, True]", job.stdout


def test_a_sink_gets_every_step_through_the_c_path_and_refusals_stay_exact(mpi_script, tmp_path):
    sink = tmp_path / "run.h5"
    job = mpi_script(f"""
        import numpy as np
        from mpipub import Client, PublishError
        c = Client(sink={str(sink)!r})
        def steps(n):
            import numpy as np
            from mpipub.engine import loop as engine
            from mpipub import publish_data
            a = np.zeros(1000)
            for i in range(n):
                a[:] = i
                publish_data({{"a": a, "i": i, "name": "x" * (i % 3)}})
                a[:] = -1
            fast = engine.fast_path_on()
            try:
                publish_data({{"bad": None}})
            except PublishError as e:
                return fast, str(e)
            return fast, "no error"
        res = c[:].apply_async(steps, 300).get(timeout=60)
        c.close()
        for fast, err in res:
            assert "cannot store key 'bad'" in err and "task" in err and "step 300" in err, err
        import mpipub
        with mpipub.open({str(sink)!r}) as run:
            t = run.task(run.tasks[-1])
            for k in (0, 1):
                a = t["a"][k]
                assert a.shape == (300, 1000) and (a == np.arange(300)[:, None]).all()
                assert t["name"][k][:4] == ["", "x", "xx", ""] and len(t["i"][k]) == 300
            assert "bad" not in t.keys
        print("FAST", [fast for fast, _ in res])
    """, nranks=3, timeout=120)
    ok(job, "FAST")
    if fastpub is not None:
        assert "FAST [True, True]" in job.stdout, job.stdout
