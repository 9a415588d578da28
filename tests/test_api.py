"""The client API against real `mpiexec` jobs: views, apply/map, namespaces, data semantics.

Each test runs one MPI job whose rank-0 script asserts; a failed assert exits non-zero with
its traceback, which the test shows.
"""

from __future__ import annotations

import os
import sys

import pytest

from conftest import ROOT, ok, run_mpi


def test_views_and_apply(mpi_script):
    job = mpi_script("""
        from mpipub import Client
        from mpi4py import MPI
        c = Client()
        assert c.ids == [1, 2, 3, 4] and len(c) == 4, c.ids
        rank = lambda: MPI.COMM_WORLD.Get_rank()
        dv = c[:]
        assert dv.block is False
        ar = dv.apply_async(rank)
        assert ar.get(timeout=20) == [1, 2, 3, 4]
        assert ar.engine_ids == [1, 2, 3, 4] and ar.ready() and ar.successful()
        assert ar.elapsed > 0
        assert c[1:3].apply_sync(rank) == [1, 2]
        assert c[[1, 3]].apply_sync(rank) == [1, 3]
        one = c[2].apply_async(rank)
        assert one.get(timeout=20) == 2 and one.engine_id == 2
        dv.block = True
        assert dv.apply(lambda x, y=1: x * y, 3, y=2) == [6, 6, 6, 6]
        dv.block = False
        assert dv.apply(lambda: 1).get(timeout=20) == [1, 1, 1, 1]
        # the default result of a function with no return is None, per engine
        assert c[4].apply_sync(lambda: None) is None
        with Client() as c2:          # the same runtime: a second handle
            assert c2.ids == c.ids
        print("OK views")
    """, nranks=5)
    ok(job, "OK views")


def test_main_functions_travel_by_value_and_namespace(mpi_script):
    job = mpi_script("""
        from mpipub import Client
        import numpy as np
        SCALE = 3
        def helper(x):
            return x * SCALE
        def uses_helper(x):
            return helper(x) + 1
        c = Client()
        dv = c[:]
        assert dv.apply_sync(uses_helper, 2) == [7, 7]
        closure_val = 10
        assert dv.apply_sync(lambda: closure_val + 1) == [11, 11]
        # numpy arguments arrive exactly
        arr = np.arange(100000, dtype=np.float32).reshape(100, 1000)
        out = dv.apply_sync(lambda a: (a.shape, a.dtype.str, float(a.sum())), arr)
        assert out == [((100, 1000), arr.dtype.str, float(arr.sum()))] * 2, out
        # push / pull / execute / item access share the engines' namespace
        dv.push({"x": 5, "arr": np.ones(3)}, block=True)
        assert dv.pull("x", block=True) == [5, 5]
        dv.execute("y = x * 2", block=True)
        assert dv.pull(["x", "y"], block=True) == [[5, 10], [5, 10]]
        dv["z"] = "hello"
        assert dv["z"] == ["hello", "hello"]
        assert c[1]["y"] == 10
        # functions from __main__ see names that were pushed
        assert dv.apply_sync(lambda: y + x) == [15, 15]
        c[2].push({"x": 100}, block=True)
        assert dv.pull("x", block=True) == [5, 100]
        print("OK namespace")
    """, nranks=3)
    ok(job, "OK namespace")


def test_map(mpi_script):
    job = mpi_script("""
        from mpipub import Client
        c = Client()
        dv = c[:]
        assert dv.map_sync(lambda x: x * x, range(10)) == [x * x for x in range(10)]
        assert dv.map_sync(lambda a, b: a + b, [1, 2, 3], [10, 20, 30]) == [11, 22, 33]
        assert dv.map_sync(str, [1, 2]) == ["1", "2"]          # fewer items than engines
        assert dv.map_sync(abs, []) == []
        ar = dv.map_async(lambda x: x + 1, range(7))
        assert ar.get(timeout=20) == list(range(1, 8))
        dv.block = True
        assert dv.map(lambda x: -x, [1, 2, 3, 4, 5]) == [-1, -2, -3, -4, -5]
        print("OK map")
    """, nranks=4)
    ok(job, "OK map")


def test_data_merge_order_and_single_engine(mpi_script):
    job = mpi_script("""
        from mpipub import Client, publish_data
        c = Client()
        def merge():
            from mpipub import publish_data
            publish_data({"a": 1, "b": "two"})
            publish_data({"a": 3})
            return "done"
        ar = c[:].apply_async(merge)
        assert ar.get(timeout=20) == ["done"] * 3
        assert ar.data == [{"a": 3, "b": "two"}] * 3, ar.data
        single = c[2].apply_async(merge)
        single.get(timeout=20)
        assert single.data == {"a": 3, "b": "two"}, single.data
        # every publication arrives before the result: after get() data holds the last step
        def loop(n):
            import numpy as np
            from mpipub import publish_data
            for i in range(n):
                publish_data({"i": i, "a": np.full(3000, i)})   # out-of-band (24 KB+)
                publish_data({"j": i})                          # small, inline
            return n
        for rep in range(5):
            ar = c[:].apply_async(loop, 200)
            ar.get(timeout=60)
            assert [d["i"] for d in ar.data] == [199] * 3, (rep, ar.data)
            assert all(d["a"][0] == 199 for d in ar.data)
            assert [d["j"] for d in ar.data] == [199] * 3
            assert sum(1 for _ in ar.stream(timeout=5)) == 3 * 400
            st = ar.stats
            assert [st[e].publications for e in c.ids] == [400] * 3, st
            assert all(st[e].last_step == 399 and st[e].bytes > 200 * 24000 for e in c.ids)
            assert all(st[e].last_time is not None for e in c.ids)
        print("OK merge")
    """, nranks=4, timeout=120)
    ok(job, "OK merge")


def test_data_is_a_snapshot(mpi_script):
    job = mpi_script("""
        import threading, time
        from mpipub import Client
        c = Client()
        def pairs(n):
            from mpipub import publish_data
            import numpy as np
            for i in range(n):
                publish_data({"x": i, "y": i, "v": np.full(10, i)})
        ar = c[:].apply_async(pairs, 20000)
        held = None
        checks = 0
        while not ar.ready():
            for d in ar.data:
                if d:
                    assert d["x"] == d["y"] == d["v"][0], d     # never half-applied
                    checks += 1
            if held is None and ar.data[0]:
                held = ar.data[0]
                frozen = dict(held)
        ar.get(timeout=60)
        assert held == frozen, "a dict returned by ar.data changed later"
        assert checks > 10, checks
        print("OK snapshot", checks)
    """, nranks=3, timeout=120)
    ok(job, "OK snapshot")


@pytest.mark.parametrize("pace_s", [0, 0.002])
def test_last_step_of_a_burst_arrives_while_the_engine_computes(mpi_script, pace_s):
    # Fast publications are coalesced; the batch still open when the task goes on computing
    # must not wait for the next publish_data call (the engine's flusher sends it). At a
    # steady pace (pace_s) the flusher is not woken by each step but expects the next one
    # (contract.WAKE_SLACK_S): the step that does not come must not keep the last one waiting.
    job = mpi_script(f"""
        import time
        from mpipub import Client
        c = Client()
        def burst_then_compute():
            import time
            from mpipub import publish_data
            for i in range(100):
                publish_data({{"i": i}})
                if {pace_s}:
                    time.sleep({pace_s})
            t = time.time()
            while time.time() - t < 3.0:   # a compute phase that holds the GIL
                sum(range(1000))
        ar = c[1].apply_async(burst_then_compute)
        while not ar.data and not ar.ready():
            time.sleep(0.001)
        t0 = time.time()
        while ar.data.get("i") != 99 and not ar.ready():
            assert time.time() - t0 < 30, ("hang", ar.data)
            time.sleep(0.001)
        # seen while the engine still computes, not only with the result
        assert not ar.ready(), ("last step not seen while the engine computes", ar.data)
        print("OK burst", round(time.time() - t0, 3))
        ar.get(timeout=30)
    """, nranks=2, timeout=60)
    ok(job, "OK burst")


def test_data_keeps_every_key_when_nobody_reads_it_and_history_wraps(mpi_script):
    # The client keeps batches undecoded until ar.data or stream() asks (asyncresult.py). A
    # key published once, long before, must still be in ar.data after the history has
    # dropped its batch many times over; the batches ar.data has not merged yet must stay
    # bounded (they would keep received memory alive); stream() says what it lost and
    # yields the rest in order.
    job = mpi_script("""
        import warnings
        import numpy as np
        from mpipub import Client
        from mpipub.client.asyncresult import MERGE_AFTER
        from mpipub.engine.sender import BATCH_BYTES
        c = Client(history_bytes=2 << 20)
        def produce(n):
            import numpy as np
            from mpipub import publish_data
            publish_data({"meta": "run-7", "a": np.zeros(4)})
            for i in range(1, n):
                publish_data({"a": np.full(8192, i), "i": i})   # 64 KiB
            return n
        for rep in range(2):
            ar = c[:].apply_async(produce, 600)
            ar.get(timeout=60)
            # (the record's internals: no public API says what rank 0 keeps alive, which is
            # the bound this test is about)
            rec = ar._rec
            kept = {id(b) for b in rec.history}
            for e in c.ids:   # what ar.data has not merged yet is still in the history
                unmerged = rec.state[e].unmerged
                assert len(unmerged) <= MERGE_AFTER and all(id(b) in kept for b in unmerged)
            assert rec.history_size <= (2 << 20) + BATCH_BYTES + 4096, rec.history_size
            for d in ar.data:
                assert d["meta"] == "run-7" and d["i"] == 599, (d.keys(), d.get("i"))
                assert d["a"].shape == (8192,) and np.all(d["a"] == 599)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                pubs = list(ar.stream())
            assert any("were dropped before being read" in str(x.message) for x in w), w
            assert pubs and pubs[-1].step == 599     # the newest batch is always kept
            for e in c.ids:   # each engine's kept steps: its newest, in order, no gap
                steps = [p.step for p in pubs if p.engine == e]
                assert steps == list(range(600 - len(steps), 600)), steps[:3]
                assert all(p.data["i"] == p.step for p in pubs if p.engine == e)
            assert len(pubs) < 1200
            assert [s.publications for s in ar.stats.values()] == [600] * len(c)
        print("OK wrap")
    """, nranks=3, timeout=120)
    ok(job, "OK wrap")


def test_arrays_held_by_the_user_survive_later_receives(mpi_script):
    # Received buffers are reused once nothing references them (wire.RecvPool): arrays the
    # user still holds (from ar.data, stream(), sliced, reshaped) must never be overwritten.
    job = mpi_script("""
        import gc, time
        import numpy as np
        from mpipub import Client
        c = Client(history_bytes=4 << 20)   # small: old publications are dropped early
        def produce(n):
            import numpy as np
            from mpipub import publish_data
            for i in range(n):
                publish_data({"a": np.full(8192, i, np.float64), "b": np.full(200_000, i)})
        held = []
        for task in range(3):
            ar = c[:].apply_async(produce, 300)
            last = None
            while not ar.ready():
                d = ar.data[0]
                if d and d["a"][0] != last and len(held) < 60 * (task + 1):
                    last = d["a"][0]
                    held.append((d["a"][::7].reshape(-1, 1), d["b"][10:20], last))
                time.sleep(0.002)
            ar.get(timeout=60)
            del ar
            gc.collect()
        assert len(held) > 5, len(held)
        for a, b, i in held:
            assert np.all(a == i) and np.all(b == i), i
        print("OK held", len(held))
    """, nranks=3, timeout=120)
    ok(job, "OK held")


@pytest.mark.parametrize("n", [100, 40000, 1 << 20])
def test_publish_copies_so_in_place_updates_arrive_as_they_were(mpi_script, n):
    job = mpi_script(f"""
        import numpy as np
        from mpipub import Client
        c = Client(history_bytes=1 << 30)  # the reader may lag: keep every step (<= 200 MiB)
        def mutate(steps, n):
            import numpy as np
            from mpipub import publish_data
            a = np.zeros(n)
            for i in range(steps):
                a[:] = i
                publish_data({{"a": a, "i": i}})
                a[:] = -1          # changed right after the call returns
            return steps
        steps = 30 if {n} < (1 << 20) else 12
        ar = c[:].apply_async(mutate, steps, {n})
        got = {{}}
        for p in ar.stream(timeout=60):
            assert p.data["a"].shape == ({n},)
            assert (p.data["a"] == p.data["i"]).all(), (p.engine, p.step, p.data["a"][:3])
            assert p.step == p.data["i"]
            got.setdefault(p.engine, []).append(p.step)
        ar.get(timeout=60)
        assert got == {{1: list(range(steps)), 2: list(range(steps))}}, got
        print("OK copy")
    """, nranks=3, timeout=120)
    ok(job, "OK copy")


def test_every_value_kind_arrives_exactly_when_publications_coalesce(mpi_script):
    # Fast publications travel many to a message (transport/packing.py): arrays of every layout and
    # dtype are rebuilt from raw bytes, other values pickled; each step must arrive as it was.
    job = mpi_script("""
        import numpy as np
        from mpipub import Client
        c = Client(history_bytes=1 << 30)
        def values(i):
            import numpy as np
            return {
                "i": i, "f": i / 3, "s": "x" * (i % 5), "b": b"\\x00" * (i % 3), "none": None,
                "flag": bool(i % 2), "np_scalar": np.float32(i), "zero_d": np.array(i),
                "small": np.full(3, i, np.int16), "big": np.full(40_000, i),  # 320 KB
                "strided": np.arange(30.0).reshape(5, 6)[:, ::2] + i,
                "fortran": np.asfortranarray(np.arange(12).reshape(3, 4) + i),
                "big_endian": np.arange(4, dtype=">f8") + i, "empty": np.zeros((0, 3)),
                "text": np.array(["a", "bc", str(i)]), "when": np.array([i], "datetime64[s]"),
                "cplx": np.array([1j * i]), "nested": {"x": np.ones(2) * i, "l": [i, "y"]},
                "lst": [i, np.arange(3) + i],
                "record": np.array([(i, 2)], dtype=[("x", "f4"), ("y", "i2")]),  # pickled
                "row": np.array([(i, 3)], dtype=[("x", "f4"), ("y", "i2")])[0],  # np.void
            }
        def produce(n, copy):
            from mpipub import publish_data
            for i in range(n):
                publish_data(values(i), copy=copy)
        def same(a, b):
            if isinstance(a, dict):
                return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
            if isinstance(a, list):
                return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
            if isinstance(a, (np.ndarray, np.generic)):
                return type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape \\
                    and np.array_equal(a, b)
            return type(a) is type(b) and a == b
        for copy in (True, False):
            ar = c[:].apply_async(produce, 300, copy)
            ar.get(timeout=60)
            pubs = list(ar.stream())
            assert len(pubs) == 600, len(pubs)
            for p in pubs:
                assert same(p.data, values(p.step)), (copy, p.engine, p.step, p.data)
            assert [p.step for p in pubs if p.engine == 1] == list(range(300))
            assert same(ar.data[0], values(299))
        # large arrays with copy=False go from the caller's memory; in place changes after
        # the task returned must not reach the client
        def big_zero_copy():
            import numpy as np
            from mpipub import publish_data
            a = np.full(1 << 20, 7.0)  # 8 MiB
            publish_data({"a": a}, copy=False)
            return a
        ar = c[1].apply_async(big_zero_copy)
        ar.get(timeout=60)
        assert np.all(ar.data["a"] == 7.0)
        # zero-copy arrays starting anywhere in a cache line arrive whole, and at the same
        # offset in a line as on the engine (wire.CACHE_LINE: the kernel's copy at full speed)
        def zero_copy_offsets():
            import numpy as np
            from mpipub import publish_data
            n = 1 << 19  # 4 MiB: engine.contract.ZERO_COPY_MIN
            def view_at(k):  # a view starting 8k bytes past a cache line of an array of its own
                a = np.arange(n + 16, dtype=np.float64) * (k + 1)
                first = (-a.ctypes.data % 64) // 8  # (numpy aligns float64 arrays to 8 bytes)
                return a[first + k:first + k + n]
            views = {f"a{k}": view_at(k) for k in (0, 1, 2, 3, 5)}
            assert [v.ctypes.data % 64 for v in views.values()] == [0, 8, 16, 24, 40]
            publish_data(views, copy=False)
            return {k: (v.copy(), v.ctypes.data % 64) for k, v in views.items()}
        ar = c[1].apply_async(zero_copy_offsets)
        sent = ar.get(timeout=60)
        for k, (v, at) in sent.items():
            got = ar.data[k]
            assert np.array_equal(got, v), k
            assert got.ctypes.data % 64 == at, (k, got.ctypes.data % 64, at)
        print("OK values")
    """, nranks=3, timeout=120)
    ok(job, "OK values")


def test_outstanding_sends_are_bounded_and_producer_waits(mpi_script):
    # The client's I/O thread is held up on purpose (the user thread holds the lock it needs):
    # the engine's sends pile up to the bound, publish_data waits, and nothing is lost.
    job = mpi_script("""
        import time
        from mpipub import Client
        c = Client(history_bytes=1 << 30)  # keep all 64 MiB for stream()
        def produce(steps):
            import numpy as np
            from mpipub import publish_data
            from mpipub.engine.loop import current_engine
            ob = current_engine().sender.outbox
            a = np.ones(1 << 17)   # 1 MiB
            peak = 0
            for i in range(steps):
                a[0] = i
                publish_data({"a": a, "i": i})
                peak = max(peak, ob.outstanding_bytes)
            return peak, ob.max_bytes, ob.waited_s
        ar = c[1].apply_async(produce, 64)
        # Stall the I/O thread's bookkeeping for 2 s (a consumer that falls behind). The reach
        # into the record stays: no public API holds rank 0's I/O thread, and a slow consumer
        # is what this test is about.
        with ar._rec.cond:
            time.sleep(2.0)
        peak, bound, waited = ar.get(timeout=60)
        assert peak <= bound, (peak, bound)
        assert waited > 0, waited          # the producer was slowed down (how much: the load's)
        steps = [p.step for p in ar.stream()]
        assert steps == list(range(64)), steps
        assert [p.data["a"][0] for p in ar.stream()] == list(range(64))
        print("OK bounded", peak, bound, round(waited, 2))
    """, nranks=2, timeout=120, env={"MPIPUB_MAX_OUTSTANDING_BYTES": str(12 << 20)})
    # (12 MiB: more than two 4 MiB batches with their headers, which may always be in flight)
    ok(job, "OK bounded")


def test_stream_stats_stdout_live(mpi_script):
    job = mpi_script("""
        import time
        from mpipub import Client, Publication
        c = Client()
        def talk(n):
            import os, sys, time
            from mpipub import publish_data
            print("hello from", n)
            print("to stderr", file=sys.stderr)
            for i in range(n):
                publish_data({"i": i})
                time.sleep(0.05)
            t0 = time.time()
            while not os.path.exists("saw_hello") and time.time() - t0 < 30:
                time.sleep(0.01)  # until the client has seen our first line
            print("bye")
            return n
        ar = c[:].apply_async(talk, 10)
        # stdout is forwarded while the task runs, not only at the end
        t0 = time.time()
        while not all("hello" in out for out in ar.stdout) and time.time() - t0 < 30:
            time.sleep(0.02)
        assert not ar.ready(), "stdout arrived only with the result"
        open("saw_hello", "w").close()
        first = next(iter(ar.stream(timeout=10)))
        assert isinstance(first, Publication) and first.step == 0
        pubs = list(ar.stream(timeout=20))
        assert ar.ready()
        assert len(pubs) == 20
        for e in c.ids:
            mine = [p for p in pubs if p.engine == e]
            assert [p.step for p in mine] == list(range(10))
            assert [p.data for p in mine] == [{"i": i} for i in range(10)]
            assert all(p.received >= p.time - 1 for p in mine)
        assert ar.stdout == ["hello from 10\\nbye\\n"] * 2, ar.stdout
        assert ar.stderr == ["to stderr\\n"] * 2, ar.stderr
        st = ar.stats
        assert st[1].publications == 10 and st[1].last_step == 9 and st[1].lag is not None
        print("OK stream")
    """, nranks=3, timeout=60)
    ok(job, "OK stream")
    # engine output is also echoed to the job's own stdout (the terminal under mpiexec)
    assert job.stdout.count("hello from 10") >= 2


def test_waits_timeouts_and_progress(mpi_script):
    job = mpi_script("""
        import time
        from mpipub import Client, MpipubError
        c = Client()
        def slow(t):
            import time
            from mpipub import publish_data
            for i in range(int(t / 0.05)):
                publish_data({"i": i}); time.sleep(0.05)
            return t
        ar = c[:].apply_async(slow, 1.0)
        assert ar.wait(0.05) is False
        try:
            ar.get(timeout=0.05)
        except TimeoutError as e:
            assert "not done" in str(e)
        else:
            raise AssertionError("no TimeoutError")
        try:
            ar.successful()
        except MpipubError:
            pass
        else:
            raise AssertionError("successful() before ready")
        ar.wait_interactive(interval=0.05)
        assert ar.ready() and ar.get() == [1.0, 1.0]
        print("OK waits")
    """, nranks=3, timeout=60)
    ok(job, "OK waits")
    assert "task 1" in job.stderr and "engine" in job.stderr, job.stderr  # the progress bar


def test_engine_comm_collectives(mpi_script):
    job = mpi_script("""
        from mpipub import Client, engine_comm, MpipubError
        c = Client()
        def halo():
            from mpipub import engine_comm
            from mpi4py import MPI
            comm = engine_comm()
            r, n = comm.Get_rank(), comm.Get_size()
            right = comm.sendrecv(MPI.COMM_WORLD.Get_rank(), dest=(r + 1) % n,
                                  source=(r - 1) % n)
            return n, comm.allreduce(MPI.COMM_WORLD.Get_rank()), right
        res = c[:].apply_sync(halo)
        assert [r[:2] for r in res] == [(5, 15)] * 5, res
        assert [r[2] for r in res] == [5, 1, 2, 3, 4], res
        try:
            engine_comm()
        except MpipubError as e:
            assert "rank 0" in str(e)
        else:
            raise AssertionError("engine_comm() on rank 0")
        print("OK comm")
    """, nranks=6, timeout=60)
    ok(job, "OK comm")


def test_nine_ranks_and_mpipub_run(tmp_path):
    script = tmp_path / "nine.py"
    script.write_text(
        "import sys\n"
        "from mpipub import Client\n"
        "c = Client()\n"
        "def f(k):\n"
        "    from mpipub import publish_data\n"
        "    for i in range(k):\n"
        "        publish_data({'i': i})\n"
        "    return k\n"
        "ar = c[:].apply_async(f, int(sys.argv[1]))\n"
        "assert ar.get(timeout=60) == [int(sys.argv[1])] * len(c)\n"
        "assert [d['i'] for d in ar.data] == [int(sys.argv[1]) - 1] * len(c)\n"
        "print('OK nine', sys.argv[1:], c.ids)\n"
        "sys.exit(int(sys.argv[2]))\n")
    job = run_mpi(9, ["-m", "mpipub", "run", str(script), "50", "0"], timeout=120)
    ok(job, "OK nine ['50', '0'] [1, 2, 3, 4, 5, 6, 7, 8]")
    job = run_mpi(3, ["-m", "mpipub", "run", str(script), "5", "4"], timeout=60)
    assert job.returncode == 4, job.output  # the script's exit status


def test_console_script_run(tmp_path):
    import os
    import shutil
    exe = shutil.which("mpipub", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("mpipub console script not installed (package not pip-installed)")
    script = tmp_path / "s.py"
    script.write_text("import sys\nfrom mpipub import Client\n"
                      "print('OK console', Client().ids, sys.argv[1:])\n")
    import subprocess

    from conftest import MPIEXEC, finish
    from mpipub.launcher import mpiexec_command
    cmd = mpiexec_command(3, [exe, "run", str(script), "--flag", "x"], mpiexec=MPIEXEC)
    proc = subprocess.Popen(cmd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    job = finish(proc, 60)
    ok(job, "OK console [1, 2] ['--flag', 'x']")


def test_public_names_one_error_family():
    """The public names are those of mpipub._WHERE (``open`` only as ``mpipub.open``), every
    exception is an MpipubError, and refused input is also the builtin type users catch."""
    import mpipub
    from mpipub import errors

    assert set(mpipub.__all__) == set(mpipub._WHERE) - {"open"}
    for name in mpipub._WHERE:
        assert getattr(mpipub, name) is not None
    ns: dict = {}
    exec("from mpipub import *", ns)
    assert ns.get("open") is None and callable(mpipub.open)
    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, BaseException) and obj.__module__ == \
                errors.__name__:
            assert issubclass(obj, mpipub.MpipubError), name
            assert name in mpipub.__all__ or name.startswith(("Remote", "Composite")), name
    assert issubclass(mpipub.PublishError, ValueError)
    assert issubclass(mpipub.TaskNotSendable, TypeError)


def test_the_type_checkers_view_of_the_public_names_is_mpipub_where():
    """mpipub._WHERE is the one list of public names; the TYPE_CHECKING imports in
    mpipub/__init__.py (what type checkers and IDEs read) must name the same, from the same
    modules."""
    import ast

    import mpipub

    tree = ast.parse((ROOT / "mpipub" / "__init__.py").read_text())
    block, = [n for n in tree.body if isinstance(n, ast.If)
              and getattr(n.test, "id", None) == "TYPE_CHECKING"]
    seen = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.dump(node)
        for alias in node.names:
            seen[alias.asname or alias.name] = node.module
    assert seen == mpipub._WHERE


def test_configuration_table_is_the_code():
    from mpipub import config

    text = (ROOT / "docs" / "configuration.md").read_text()
    for s in config.SETTINGS.values():
        assert f"| `{s.name}` | `{s.default!r}` |" in text, s.name
        assert s.help in text, s.name
    assert config.get("MPIPUB_LINGER_S") == config.SETTINGS["MPIPUB_LINGER_S"].default or \
        "MPIPUB_LINGER_S" in os.environ


@pytest.mark.parametrize("name,value", [("MPIPUB_ENGINE_POLL_MAX_S", "-1"),
                                        ("MPIPUB_CLOSE_TIMEOUT_S", "ten"),
                                        ("MPIPUB_MAX_OUTSTANDING_COUNT", "1.5"),
                                        ("MPIPUB_PURE_PYTHON", "maybe")])
def test_a_bad_setting_is_one_clear_error(tmp_path, name, value):
    script = tmp_path / "s.py"
    script.write_text("from mpipub import Client\nc = Client()\nprint('SHOULD NOT GET HERE')\n")
    job = run_mpi(2, [str(script)], env={name: value}, timeout=60)
    assert job.returncode != 0, job.output
    assert "SHOULD NOT GET HERE" not in job.stdout
    assert f"mpipub.errors.ConfigError: {name}={value!r}: expected " in job.stderr, job.output
