"""Bad input to the core runtime: publish_data where it cannot work, values it must deliver
exactly or refuse clearly, tasks that cannot be serialised, and errors raised by tasks.

Every case runs in a real `mpiexec` job (never a mocked MPI). The job scripts assert on what
the client sees and exit non-zero (with the traceback in the output) when something is wrong,
so each test checks the exit status and a final marker line.
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import PYTHON, mpi_env

OUTSIDE = "It only works inside a function that the client sent to an engine"


def test_publish_data_outside_mpi_is_a_clear_error(tmp_path):
    """Plain Python, no MPI job: the error says so (and MPI is not started to say it)."""
    code = ("import sys, mpipub\n"
            "try:\n"
            "    mpipub.publish_data({'a': 1})\n"
            "except mpipub.MpipubError as e:\n"
            "    print('ERR', e)\n"
            "print('mpi started:', 'mpi4py.MPI' in sys.modules)\n")
    p = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60,
                       env=mpi_env(), cwd=tmp_path, start_new_session=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ERR publish_data() was called outside an mpipub engine (no MPI job" in p.stdout
    assert OUTSIDE in p.stdout
    assert "mpi started: False" in p.stdout


def test_publish_data_outside_a_task_names_where(mpi_script):
    """Rank 0 (before and after Client()), an engine rank before Client(), and an idle engine
    (a timer thread that a finished task left behind calls publish_data)."""
    job = mpi_script("""
        import time
        from mpi4py import MPI
        from mpipub import Client, MpipubError, publish_data

        rank = MPI.COMM_WORLD.Get_rank()
        try:
            publish_data({'a': 1})
        except MpipubError as e:
            print(f'BEFORE{rank}: {e}', flush=True)

        c = Client()  # engines serve here, then exit; below runs on rank 0 only
        try:
            publish_data({'a': 1})
        except MpipubError as e:
            print(f'AFTER0: {e}', flush=True)

        def leave_a_timer():
            import threading
            def late():
                global late_error
                try:
                    publish_data({'late': 1})
                    late_error = 'no error'
                except Exception as e:
                    late_error = f'{type(e).__name__}: {e}'
            threading.Timer(0.2, late).start()

        c[1].apply_sync(leave_a_timer)
        deadline = time.monotonic() + 30  # engine 1 is idle when the timer fires
        while True:
            try:
                late = c[1].pull('late_error', block=True)
                break
            except Exception:
                assert time.monotonic() < deadline, 'the timer never published'
                time.sleep(0.05)
        print('IDLE:', late, flush=True)
        assert c[1].apply_sync(lambda: 'still serving') == 'still serving'
        print('DONE')
    """, nranks=3, timeout=60)
    assert job.returncode == 0, job.output
    out = job.stdout
    assert "BEFORE0: publish_data() was called on rank 0, which is the client" in out, out
    for r in (1, 2):
        assert f"BEFORE{r}: publish_data() was called on MPI rank {r} before Client()" in out, out
    assert "AFTER0: publish_data() was called on rank 0, which is the client" in out, out
    # a thread the task left running: refused, naming the thread and the task
    assert ("IDLE: MpipubError: publish_data() called from thread 'Thread-1', which task 1 "
            "(leave_a_timer()) started on engine 1 and left running") in out, out
    assert out.count(OUTSIDE) == 4, out
    assert "DONE" in out


def test_bad_values_are_delivered_exactly_or_refused(mpi_script):
    job = mpi_script("""
        import pickle
        import socket
        import threading

        import numpy as np
        from mpipub import Client, PublishError, RemoteError, publish_data

        c = Client()

        def values():
            base = np.arange(120, dtype=np.float64).reshape(6, 20)
            return {
                'strided': base[::2, ::3],
                'transposed': base.T,
                'reversed': base[::-1, ::-1],
                'fortran': np.asfortranarray(base),
                'big_strided': np.arange(200_000, dtype=np.int32)[::3],  # not inline
                'empty': np.zeros((0, 3)),
                'empty_c': np.empty(0, dtype=np.complex128),
                'empty_big': np.zeros((5, 0, 40_000)),
                'zero_d': np.array(5.5),
                'zero_d_int': np.array(7, dtype=np.int16),
                'scalar': np.float32(2.5),
                'objects': np.array([1, 'x', None, {'k': [1, 2]}], dtype=object),
                'structured': np.array([(1, 2.0)], dtype=[('a', 'i4'), ('b', 'f8')]),
                'text': 'hello',
            }

        def publish_bad_then_good():
            errors = {}
            publish_data({'i': 0})
            for name, bad in [('nondict', [('a', 1)]), ('nonstr', {1: 'one'}),
                              ('tuplekey', {('a', 'b'): 1}),
                              ('lock', {'fine': 1, 'the_lock': threading.Lock()}),
                              ('objlock', {'objarr': np.array([threading.Lock()], object)})]:
                try:
                    publish_data(bad)
                except PublishError as e:
                    errors[name] = str(e)
            publish_data(values())
            publish_data({'i': 2})
            return errors

        ar = c[1].apply_async(publish_bad_then_good)
        errors = ar.get(timeout=60)
        where = f'(engine 1, task {ar.task_id}, step 1)'
        assert errors['nondict'] == ('publish_data() takes a dict of name -> value, got list '
                                     + where), errors
        assert "keys must be str, got 1 of type int" in errors['nonstr'], errors
        assert where in errors['nonstr'] and where in errors['tuplekey'], errors
        assert "cannot send key 'the_lock'" in errors['lock'], errors
        assert "lock" in errors['lock'] and where in errors['lock'], errors
        assert "cannot send key 'objarr'" in errors['objlock'] and where in errors['objlock']
        # refused calls sent nothing: steps 0, 1, 2 arrived, in order, nothing else
        pubs = list(ar.stream())
        assert [p.step for p in pubs] == [0, 1, 2], [p.step for p in pubs]
        assert 'fine' not in ar.data and 'the_lock' not in ar.data
        assert ar.data['i'] == 2
        for k, v in values().items():
            got = ar.data[k]
            assert type(got) is type(v), (k, type(got), type(v))
            if isinstance(v, np.ndarray):
                assert got.shape == v.shape and got.dtype == v.dtype, (k, got, v)
                if v.dtype != object:
                    assert np.array_equal(got, v), (k, got, v)
                else:
                    assert got.tolist() == v.tolist(), (k, got, v)
            else:
                assert got == v, (k, got, v)

        # refused as the first publication of a batch, also while the flusher is busy with
        # the previous one (sent after a short pause, still in flight)
        def refused_first():
            import time
            big = np.zeros(1 << 17)  # 1 MiB: in flight a while
            for i in range(20):
                publish_data({'i': i, 'big': big})
                time.sleep(0.0002 * (i % 4))  # sent by the flusher, maybe still in flight
                try:
                    publish_data({'bad': threading.Lock()})
                except PublishError:
                    pass
                time.sleep(0.003)   # computing, with the refused call's batch left behind
            return 'ok'

        ar = c[2].apply_async(refused_first)
        assert ar.get(timeout=60) == 'ok'
        assert [p.data['i'] for p in ar.stream()] == list(range(20))

        # uncaught: the task fails with a RemoteError naming engine, key and step ...
        def fail_at_step_2():
            publish_data({'ok': 0})
            publish_data({'ok': 1, 'arr': np.arange(50_000)})
            publish_data({'ok': 2, 'bad': threading.Lock()})
            return 'not reached'

        ar = c[2].apply_async(fail_at_step_2)
        try:
            ar.get(timeout=60)
            raise AssertionError('no error')
        except RemoteError as e:
            assert e.engine_id == 2 and e.ename == 'PublishError', e
            assert e.host == socket.gethostname(), e.host
            text = str(e)
            assert "engine 2" in text and "'bad'" in text, text
            assert f"(engine 2, task {ar.task_id}, step 2)" in text, text
            assert "fail_at_step_2" in e.traceback, e.traceback
        # ... and the steps accepted before it are all there
        assert [p.step for p in ar.stream()] == [0, 1], list(ar.stream())
        assert ar.data['ok'] == 1 and np.array_equal(ar.data['arr'], np.arange(50_000))
        assert 'bad' not in ar.data
        # both engines keep serving
        assert c[:].apply_sync(lambda: 'alive') == ['alive', 'alive']
        print('DONE')
    """, nranks=3, timeout=90)
    assert job.returncode == 0, job.output
    assert "DONE" in job.stdout, job.output


def test_a_value_the_client_cannot_rebuild_is_reported_and_the_rest_arrives(mpi_script):
    """A value pickles on the engine but fails to unpickle on rank 0: the client says which
    engine, task, step and key on stderr, leaves that key out, and loses nothing else, both
    in ``ar.data`` (where the key keeps its previous value) and in ``stream()``."""
    job = mpi_script("""
        import numpy as np
        from mpipub import Client

        class Unloadable:  # pickles as int("not a number"): raises when the client loads it
            def __reduce__(self):
                return (int, ("not a number",))

        c = Client()
        def produce(bad_at):
            import numpy as np
            from mpipub import publish_data
            for i in range(40):
                value = Unloadable() if i == bad_at else i
                publish_data({"a": np.full(1000, i), "v": value, "i": i})
        ar = c[1].apply_async(produce, 39)   # the last step's "v" is bad
        ar.get(timeout=60)
        d = ar.data
        assert d["i"] == 39 and d["a"][0] == 39, d
        assert d["v"] == 38, d["v"]          # the newest value that could be rebuilt
        pubs = list(ar.stream())
        assert [p.step for p in pubs] == list(range(40))
        assert all(p.data["i"] == p.step and p.data["a"][0] == p.step for p in pubs)
        assert "v" not in pubs[39].data and pubs[38].data["v"] == 38
        ar = c[1].apply_async(produce, 5)
        ar.get(timeout=60)
        assert ar.data["v"] == 39
        assert "v" not in [p for p in ar.stream()][5].data
        print("OK undecodable")
    """, nranks=2, timeout=60)
    assert job.returncode == 0, f"exit {job.returncode}\n{job.output}"
    assert "OK undecodable" in job.stdout
    said = [line for line in job.stderr.splitlines() if "could not be decoded" in line]
    assert ("mpipub: engine 1, task 1, step 39: the value of key 'v' could not be decoded on "
            "the client and is left out: ValueError(") in job.stderr, job.stderr
    assert "engine 1, task 2, step 5: the value of key 'v'" in job.stderr, job.stderr
    assert len(said) == 2, said  # once each, though ar.data and stream() both decoded it


@pytest.mark.bigmem
def test_array_over_2gib_is_delivered_exactly(mpi_script):
    """One value over 2 GiB (MPI large counts). Rank 0 and the engine both hold copies
    (about 7 GB in all); deselect with ``-m 'not bigmem'`` on small CI machines."""
    avail = _mem_available_bytes()
    if avail is not None and avail < 8 << 30:
        pytest.skip(f"needs about 8 GB of free memory, {avail / 2**30:.1f} GiB available")
    job = mpi_script("""
        import numpy as np
        from mpipub import Client

        c = Client()
        SHAPE = (32769, 65536)  # uint8: 2 GiB + 64 KiB

        def big(shape):
            import numpy as np
            from mpipub import publish_data
            publish_data({'step': 0})
            n = shape[0] * shape[1]
            a = np.resize(np.arange(251, dtype=np.uint8), n).reshape(shape)
            publish_data({'big': a, 'step': 1})
            del a
            publish_data({'step': 2})
            return n

        ar = c[1].apply_async(big, SHAPE)
        n = ar.get(timeout=400)
        a = ar.data['big']
        assert n > 2**31 and a.shape == SHAPE and a.dtype == np.uint8, (n, a.shape, a.dtype)
        flat = a.reshape(-1)
        idx = np.concatenate([[0, 1, 250, 251, 2**31 - 1, 2**31, 2**31 + 1, n - 1],
                              np.random.default_rng(0).integers(0, n, 2000)])
        assert (flat[idx] == idx % 251).all()
        st = ar.stats[1]
        assert ar.data['step'] == 2 and (st.publications, st.last_step) == (3, 2), st
        assert st.bytes > 2**31, st
        del a, flat, ar
        assert c[1].apply_sync(lambda: 'alive') == 'alive'
        print('DONE')
    """, nranks=2, timeout=480)
    assert job.returncode == 0, job.output
    assert "DONE" in job.stdout, job.output


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def test_unserialisable_tasks_fail_at_submit_naming_the_culprit(mpi_script):
    job = mpi_script("""
        import threading
        from mpipub import Client

        c = Client()
        dv = c[:]
        lock = threading.Lock()

        def ident(*args, **kwargs):
            return args, kwargs

        def expect_type_error(call, *needles):
            try:
                call()
            except TypeError as e:
                for n in needles:
                    assert n in str(e), (n, str(e))
                print('OK:', e)
                return
            raise AssertionError(f'no TypeError; expected {needles}')

        uses_lock = lambda: lock.locked()  # noqa: E731 - a lambda on purpose
        expect_type_error(lambda: dv.apply_async(uses_lock),
                          'the function <lambda> cannot be serialised', 'lock')
        gen = (i for i in range(3))
        expect_type_error(lambda: dv.apply_async(ident, 1, gen),
                          'ident()', 'argument 1 (generator)', 'generator')
        expect_type_error(lambda: c[1].apply_async(ident, 1, x=2, g=gen),
                          "keyword argument 'g' (generator)")
        expect_type_error(lambda: dv.map_async(lambda x: lock, [1, 2, 3]), '<lambda>', 'lock')
        expect_type_error(lambda: dv.push({'l': lock}), 'lock')
        # nothing was sent: the job goes on, and the next tasks work
        assert dv.apply_sync(ident, 1, x=2) == [((1,), {'x': 2})] * 2
        assert dv.map_sync(lambda x: 2 * x, range(5)) == [0, 2, 4, 6, 8]
        print('DONE')
    """, nranks=3, timeout=60)
    assert job.returncode == 0, job.output
    assert job.stdout.count("OK: cannot send") == 5, job.output
    assert "DONE" in job.stdout, job.output


def test_remote_errors_name_engine_host_type_message_and_traceback(mpi_script):
    job = mpi_script("""
        import socket
        from mpipub import Client, CompositeError, RemoteError

        c = Client()
        host = socket.gethostname()

        def fail_on(bad):
            from mpi4py import MPI
            me = MPI.COMM_WORLD.Get_rank()
            if me in bad:
                raise ValueError(f'bad value on {me}')
            return me

        # one engine of a multi-engine task fails: a CompositeError (as in ipyparallel), which
        # is a RemoteError with that engine's details; a single-engine view: a RemoteError
        try:
            c[2].apply_sync(fail_on, [2])
            raise AssertionError('no error')
        except CompositeError:
            raise
        except RemoteError as e:
            assert (e.engine_id, e.ename) == (2, 'ValueError'), e
        try:
            c[:].apply_sync(fail_on, [2])
            raise AssertionError('no error')
        except CompositeError as e:
            assert [x.engine_id for x in e.errors] == [2], e.errors
            assert '1 engine failed (2)' in str(e), str(e)
            e = e.errors[0]
            assert (e.engine_id, e.host, e.ename, e.evalue) == (2, host, 'ValueError',
                                                                'bad value on 2'), e
            # the traceback starts in the user's function and names the client's script
            # and source line (cloudpickle ships them as '<dynamic-code>'; the engine fixes it)
            assert 'in fail_on' in e.traceback, e.traceback
            assert 'script1.py", line' in e.traceback, e.traceback
            assert "raise ValueError(f'bad value on {me}')" in e.traceback, e.traceback
            assert 'mpipub/engine/' not in e.traceback, e.traceback
            assert e.traceback.rstrip().endswith('ValueError: bad value on 2'), e.traceback
            s = str(e)
            assert s.startswith(f'engine 2 ({host}) raised ValueError: bad value on 2'), s
            assert 'remote traceback (engine 2)' in s and 'in fail_on' in s, s

        # several fail: a CompositeError listing each failed engine (and no other)
        try:
            c[:].apply_sync(fail_on, [1, 3])
            raise AssertionError('no error')
        except CompositeError as e:
            assert [x.engine_id for x in e.errors] == [1, 3], e.errors
            assert all(x.ename == 'ValueError' for x in e.errors)
            s = str(e)
            assert '2 engines failed (1, 3)' in s, s
            assert f'[engine 1 on {host}] ValueError: bad value on 1' in s, s
            assert f'[engine 3 on {host}] ValueError: bad value on 3' in s, s
            assert 'engine 2' not in s, s
            assert isinstance(e, RemoteError)

        # an engine whose task raised serves the next task, with its namespace intact
        c[:].execute('x = 41')
        try:
            c[1].execute('1 / 0', block=True)
            raise AssertionError('no error')
        except RemoteError as e:
            assert e.ename == 'ZeroDivisionError' and e.engine_id == 1, e
        assert c[:].apply_sync(fail_on, []) == [1, 2, 3]
        assert c[1].apply_sync(lambda: x + 1) == 42
        try:
            c[0]
            raise AssertionError('no error')
        except IndexError as e:
            assert 'rank 0 is the client' in str(e) and '1..3' in str(e), e
        print('DONE')
    """, nranks=4, timeout=60)
    assert job.returncode == 0, job.output
    assert "DONE" in job.stdout, job.output
