"""ipyparallel idioms through mpipub's public API (issue 18), in real `mpiexec` jobs.

Each test runs one job whose rank-0 script asserts; a failed assert exits non-zero with its
traceback, which the test shows.
"""

from __future__ import annotations

from conftest import ok


def test_the_function_is_positional_only_so_user_keywords_never_collide(mpi_script):
    job = mpi_script("""
        from mpipub import Client
        c = Client()
        dv = c[:]
        def kw(f=0, sequences=0, self=0, fn=0):
            return (f, sequences, self, fn)
        assert dv.apply_sync(kw, f=5) == [(5, 0, 0, 0)] * 2
        assert dv.apply_async(kw, f=5, self=1).get(timeout=20) == [(5, 0, 1, 0)] * 2
        dv.block = True
        assert dv.apply(kw, f=6, fn=2) == [(6, 0, 0, 2)] * 2
        assert c[1].apply_sync(kw, sequences=3) == (0, 3, 0, 0)
        print("OK positional")
    """, nranks=3)
    ok(job, "OK positional")


def test_a_pushed_main_function_called_from_execute_sees_the_engine_namespace(mpi_script):
    job = mpi_script("""
        from mpipub import Client
        c = Client()
        v = c[:]
        def geta():
            return a
        v.execute('a = 5', block=True)
        assert v.apply_sync(geta) == [5, 5]
        v['f'] = geta
        v.execute('b = f()', block=True)
        assert v['b'] == [5, 5]
        v.push({'g': geta, 'h': [geta]}, block=True)
        v.execute('a = 7; b = g()', block=True)
        assert v['b'] == [7, 7]
        print("OK pushed function")
    """, nranks=3)
    ok(job, "OK pushed function")


def test_engine_selection_negative_indices_direct_view_slices_and_duplicates(mpi_script):
    job = mpi_script("""
        import numpy as np
        from mpi4py import MPI
        from mpipub import Client
        c = Client()
        rank = lambda: MPI.COMM_WORLD.Get_rank()
        assert c.ids == [1, 2, 3, 4]
        assert c[-1].apply_sync(rank) == 4 and c[-4].apply_sync(rank) == 1
        assert c[[-1, 1]].targets == [4, 1] and c[-2:].targets == [3, 4]
        assert c[np.int64(2)].targets == [2] and c[np.array([3, 1])].targets == [3, 1]
        assert c.direct_view('all').apply_sync(rank) == [1, 2, 3, 4]
        assert c.direct_view().targets == c.direct_view(None).targets == [1, 2, 3, 4]
        assert c.direct_view([2, 3]).targets == [2, 3] and c.direct_view(-1).targets == [4]
        assert c[:].targets == c[0:].targets == [1, 2, 3, 4] and c[1:3].targets == [1, 2]
        assert c[2::2].targets == [2, 4]

        def refused(key, *words, exc=IndexError):
            try:
                c[key]
            except exc as e:
                for w in words:
                    assert w in str(e), (key, str(e))
                return
            raise AssertionError(f'c[{key!r}] was accepted')

        # a slice through rank 0 holds fewer engines than its positions say: refused
        refused(slice(None, 2), 'slice [:2]', 'rank 0', 'engines [1] only', 'c.ids[:2]')
        refused(slice(None, None, 2), 'slice [::2]', 'rank 0')
        refused(slice(None, None, -1), 'rank 0')
        refused(-5, 'engine index -5', '4 engines')
        refused(0, 'rank 0 is the client')
        refused(9, 'no engine 9')
        refused('1', exc=TypeError)
        refused([1, [2]], exc=TypeError)
        refused(slice(7, None), 'selects no engines')
        refused([], 'selects no engines')
        # duplicates, however the view is made (issue 12: c[[1, 1]] used to hang)
        refused([1, 1], 'engine 1 appears twice in [1, 1]')
        refused((2, 3, 2), 'engine 2 appears twice')
        refused([4, -1], 'engine -1 (engine 4) appears twice')
        refused(np.array([2, 2]), 'engine 2 appears twice')
        for bad in ([1, 1], [3, -2]):
            try:
                c.direct_view(bad)
                raise AssertionError('accepted')
            except IndexError as e:
                assert 'appears twice' in str(e), e
        v = c[:]
        try:
            v.targets = [2, 2]
            raise AssertionError('accepted')
        except IndexError as e:
            assert 'engine 2 appears twice' in str(e), e
        assert v.targets == [1, 2, 3, 4]
        v.targets = [3, 1]
        assert v.apply_sync(rank) == [3, 1]
        print('OK selection')
    """, nranks=5)
    ok(job, "OK selection")


def test_asyncresult_as_a_container_metadata_and_times(mpi_script):
    job = mpi_script("""
        import datetime, time
        from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION
        from mpi4py import MPI
        from mpipub import Client, CompositeError, RemoteError
        c = Client()
        dv = c[:]
        def nap(s_by_rank):
            import time
            from mpi4py import MPI
            r = MPI.COMM_WORLD.Get_rank()
            print('hello from', r)
            time.sleep(s_by_rank.get(r, 0))
            if s_by_rank.get(-r):
                raise ValueError(f'bad {r}')
            return r * 10
        ar = dv.apply_async(nap, {1: 0.0, 2: 0.5, 3: 1.0})
        assert len(ar) == 3 and ar.sent
        seen = []
        for r in ar:                         # each result in order, as soon as it is there
            seen.append((r, ar.progress))
        assert [r for r, _ in seen] == [10, 20, 30], seen
        assert seen[0][1] >= 1 and seen[-1][1] == 3, seen
        assert ar.get_dict() == {1: 10, 2: 20, 3: 30}
        assert ar[0] == 10 and ar[-1] == 30 and ar[1:] == [20, 30]
        md = ar.metadata
        assert [m['engine_id'] for m in md] == [1, 2, 3] and md[0]['status'] == 'ok'
        assert all(isinstance(m['completed'], datetime.datetime) for m in md)
        assert ar['completed'] == [m['completed'] for m in md]
        assert ar['engine_id'] == [1, 2, 3]
        assert ar.started <= ar.completed and ar.submitted <= ar.completed
        assert 1.0 <= ar.wall_time < 30, ar.wall_time
        assert 1.4 <= ar.serial_time < 30, ar.serial_time    # 0 + 0.5 + 1.0 s of naps
        assert md[1]['stdout'] == 'hello from 2\\n' and ar.wait_for_output(5)
        try:
            ar['nope']
            raise AssertionError('accepted')
        except KeyError as e:
            assert 'completed' in str(e)
        one = c[2].apply_async(nap, {})
        assert one.get() == 20 and len(one) == 1 and one.metadata['engine_id'] == 2
        assert one['status'] == 'ok' and one.get_dict() == {2: 20} and list(one) == [20]
        # map: len and iteration over the items
        m = dv.map_async(lambda x: x * 2, range(7))
        assert len(m) == 7 and list(m) == [0, 2, 4, 6, 8, 10, 12] and m[3] == 6
        # return_when
        slow = dv.apply_async(nap, {1: 0.0, 2: 3.0, 3: 3.0})
        assert slow.wait(20, return_when=FIRST_COMPLETED) is False
        assert slow.progress >= 1 and slow['status'][0] == 'ok'
        bad = dv.apply_async(nap, {-1: 1, 2: 3.0, 3: 3.0})
        assert bad.wait(20, return_when=FIRST_EXCEPTION) is False   # (not every engine done)
        assert isinstance(bad.metadata[0]['error'], RemoteError)
        bad.wait_interactive(timeout=20, return_when='FIRST_EXCEPTION')
        # get(return_exceptions=True): errors in place of results
        out = bad.get(timeout=20, return_exceptions=True)
        assert isinstance(out[0], RemoteError) and out[1:] == [20, 30], out
        assert slow.get(timeout=20) == [10, 20, 30]
        # display_outputs: [stdout:N] headers
        ar.display_outputs()
        try:
            dv.apply_async(nap, {}).wait(1, return_when='SOMETIME')
            raise AssertionError('accepted')
        except ValueError as e:
            assert 'FIRST_EXCEPTION' in str(e)
        print('OK container')
    """, nranks=4, timeout=90)
    ok(job, "OK container", "[stdout:1] hello from 1\n[stdout:2] hello from 2\n")
