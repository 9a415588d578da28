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
        assert isinstance(bad.exception(timeout=20), CompositeError) and bad.done()
        assert slow.result(timeout=20) == [10, 20, 30] and slow.exception() is None
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


def test_composite_error_api_and_task_aborted_on_rank_0(mpi_script):
    job = mpi_script("""
        import time
        from mpipub import Client, CompositeError, MpipubError, RemoteError, TaskAborted
        c = Client()
        dv = c[:]
        def fail_on(bad):
            from mpi4py import MPI
            me = MPI.COMM_WORLD.Get_rank()
            if me in bad:
                raise ValueError(f'bad value on {me}')
            return me
        try:
            dv.apply_sync(fail_on, [1, 3])
            raise AssertionError('no error')
        except CompositeError as e:
            assert isinstance(e, RemoteError) and isinstance(e, MpipubError)
            assert [x[0] for x in e.elist] == ['ValueError', 'ValueError'], e.elist
            assert [x[3]['engine_id'] for x in e.elist] == [1, 3], e.elist
            assert e.elist[1][1] == 'bad value on 3' and 'in fail_on' in e.elist[1][2]
            lines = e.render_traceback()
            heads = [ln for ln in lines if ln.startswith('[')]
            assert heads[0].startswith('[1:apply]') and heads[1].startswith('[3:apply]'), lines
            assert e.render_traceback(1)[0].startswith('[3:apply]')
            assert '[1:apply]' in str(e) and '[3:apply]' in str(e) and 'in fail_on' in str(e)
            e.print_traceback()
            try:
                e.raise_exception(1)
            except RemoteError as one:
                assert one.engine_id == 3 and not isinstance(one, CompositeError)
            try:
                e.raise_exception(5)
            except IndexError as bad:
                assert 'holds 2' in str(bad)
        # tb_limit: at most that many tracebacks, and a count of the rest
        try:
            dv.apply_sync(fail_on, [1, 2, 3])
        except CompositeError as e:
            e.tb_limit = 1
            text = '\\n'.join(e.render_traceback())
            assert '[1:apply]' in text and '[2:apply]' not in text and '2 more exceptions' in text
        try:
            dv.execute('1/0', block=True)
        except CompositeError as e:
            assert e.render_traceback()[0].startswith('[1:execute]'), e.render_traceback()
        # an aborted task: except TaskAborted on rank 0, for one engine and for several
        def wait_publishing():
            import time
            from mpipub import publish_data
            while True:
                publish_data({'x': 1})
                time.sleep(0.01)
        for view in (c[1], dv):
            ar = view.apply_async(wait_publishing)
            while not all(s.publications for s in ar.stats.values()):
                time.sleep(0.01)
            ar.abort()
            try:
                ar.get(timeout=20)
                raise AssertionError('no error')
            except TaskAborted as e:
                assert isinstance(e, RemoteError) and e.ename == 'TaskAborted', repr(e)
                assert isinstance(e, CompositeError) == (view is dv), repr(e)
        print('OK errors')
    """, nranks=4)
    ok(job, "OK errors", "[1:apply]")


def test_view_wait_abort_flags_execute_and_client_wait(mpi_script):
    job = mpi_script("""
        import time
        from mpipub import AsyncResult, Client, TaskAborted
        c = Client()
        dv = c[:]
        def nap(s):
            import time
            time.sleep(s)
            return s
        a = dv.apply_async(nap, 0.3)
        b = c[1].apply_async(nap, 0.1)
        assert dv.wait(timeout=30) and a.ready()           # (b is c[1]'s, not dv's)
        assert dv.wait([a, b], timeout=30) and c.wait(b, timeout=30)
        slow = dv.apply_async(nap, 2.0)
        assert c.wait(timeout=0.1) is False
        assert c.wait(timeout=30) is True and slow.ready()
        # view.abort(): every task this view has queued or running (none publish: the
        # running ones end, the queued ones are skipped)
        first = c[2].apply_async(nap, 0.5)
        queued = [c[2].apply_async(nap, 0.0) for _ in range(5)]
        view2 = c[2]
        mine = [view2.apply_async(nap, 0.0) for _ in range(3)]
        view2.abort()
        for ar in mine:
            try:
                ar.get(timeout=30)
                raise AssertionError('not aborted')
            except TaskAborted:
                pass
        assert first.get(timeout=30) == 0.5 and [q.get(timeout=30) for q in queued] == [0.0] * 5
        extra = [c[2].apply_async(nap, 0.5), c[2].apply_async(nap, 0.0)]
        view2.abort(extra[1])
        assert extra[0].get(timeout=30) == 0.5
        try:
            extra[1].get(timeout=30)
            raise AssertionError('not aborted')
        except TaskAborted:
            pass
        # temp_flags, execute returning the AsyncResult also when blocking
        assert dv.block is False
        with dv.temp_flags(block=True):
            assert dv.apply(nap, 0) == [0, 0, 0]
            ar = dv.execute('q = 3')
            assert isinstance(ar, AsyncResult) and ar.ready() and ar.get() == [None] * 3
        assert dv.block is False and isinstance(dv.apply(nap, 0), AsyncResult)
        assert isinstance(dv.execute('q = 4', block=True), AsyncResult) and dv['q'] == [4] * 3
        try:
            with dv.temp_flags(track=True):
                pass
            raise AssertionError('accepted')
        except TypeError as e:
            assert 'track' in str(e)
        assert dv.use_cloudpickle() is None and dv.use_pickle() is None
        assert c.use_cloudpickle() is None and c.use_pickle() is None
        assert dv.map(lambda x: x + 1, [1, 2], block=True) == [2, 3]
        print('OK waits')
    """, nranks=4, timeout=90)
    ok(job, "OK waits")


def test_scatter_gather_reference_dotted_names_sync_imports_run_clear(mpi_script, tmp_path):
    (tmp_path / "setup_engines.py").write_text("from math import pi\nran_setup = pi > 3\n")
    job = mpi_script("""
        import sys, types
        import numpy as np
        from mpipub import Client, Reference, RemoteError
        c = Client()
        dv = c[:]
        # scatter / gather: contiguous parts, the first ones longer; arrays along axis 0
        dv.scatter('x', list(range(10)), block=True)
        assert dv['x'] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]], dv['x']
        assert dv.gather('x', block=True) == list(range(10))
        a = np.arange(14.0).reshape(7, 2)
        dv.scatter('a', a).get(timeout=20)
        assert [p.shape for p in dv['a']] == [(3, 2), (2, 2), (2, 2)]
        g = dv.gather('a').get(timeout=20)
        assert isinstance(g, np.ndarray) and (g == a).all()
        dv.scatter('one', [10, 20, 30], flatten=True, block=True)
        assert dv['one'] == [10, 20, 30] and dv.gather('one', block=True) == [10, 20, 30]
        dv.scatter('few', [1, 2], block=True)
        assert dv['few'] == [[1], [2], []] and dv.gather('few', block=True) == [1, 2]
        assert c[2].gather('x', block=True) == [4, 5, 6]
        # Reference: resolved on the engine, in args, nested, kwargs and as map's function
        dv.execute('import numpy as np; k = 5; obj = type("O", (), {})(); obj.val = 7')
        def f(a, b=None, c=()):
            return (a, b, c)
        assert dv.apply_sync(f, Reference('k'), b=[Reference('obj.val'), {'z': Reference('k')}],
                             c=(Reference('k'),)) == [(5, [7, {'z': 5}], (5,))] * 3
        dv.execute('def triple(v):\\n    return 3 * v')
        assert dv.map_sync(Reference('triple'), range(5)) == [0, 3, 6, 9, 12]
        assert dv.apply_sync(Reference('triple'), 2) == [6, 6, 6]
        assert dv.map_sync(lambda a, b: a + b, [1, 2, 3], [Reference('k')] * 3) == [6, 7, 8]
        try:
            dv.apply_sync(f, Reference('nothere'))
            raise AssertionError('no error')
        except RemoteError as e:
            assert e.ename == 'NameError' and "'nothere' is not defined on engine 1" in e.evalue
        for bad in ('a b', '1x', 'a..b'):
            try:
                Reference(bad)
                raise AssertionError('accepted')
            except ValueError as e:
                assert repr(bad) in str(e)
        # dotted names: nested get and set
        assert dv['obj.val'] == [7] * 3
        dv['obj.val'] = 8
        assert dv.pull(['obj.val', 'k'], block=True) == [[8, 5]] * 3
        try:
            dv['obj.nope']
            raise AssertionError('no error')
        except RemoteError as e:
            assert e.ename == 'AttributeError' and 'nope' in e.evalue
        # sync_imports: the block's imports run on the client and every engine
        assert 'colorsys' not in sys.modules
        with dv.sync_imports():
            import colorsys
            from json import dumps as _d
        assert 'colorsys' in sys.modules
        assert dv.apply_sync(lambda: colorsys.__name__) == ['colorsys'] * 3
        dv.execute('r = dumps([1])', block=True)
        assert dv['r'] == ['[1]'] * 3
        # run(filename): a client-side file executed in each engine's namespace
        dv.run('setup_engines.py', block=True)
        assert dv['ran_setup'] == [True] * 3
        # clear(): the namespace is empty again
        dv.clear(block=True)
        try:
            dv['k']
            raise AssertionError('still there')
        except RemoteError as e:
            assert e.ename == 'NameError'
        dv.execute('k = 1', block=True)
        assert dv['k'] == [1] * 3
        print('OK data movement')
    """, nranks=4, timeout=90)
    ok(job, "OK data movement", "importing colorsys on engine(s)",
       "importing dumps from json on engine(s)")


def test_split_and_join(mpi_script):
    job = mpi_script("""
        import time
        from mpipub import AsyncResult, Client

        c = Client()

        def work(pause):
            import time
            from mpipub import engine_comm, publish_data
            me = engine_comm().rank + 1
            for i in range(3):
                publish_data({"i": i, "me": me})
            time.sleep(pause * me)
            print("engine", me)
            return me * 10

        ar = c[:].apply_async(work, 0.5)
        parts = ar.split()
        assert [p.engine_id for p in parts] == c.ids and all(len(p) == 1 for p in parts)
        assert parts[0].get(timeout=30) == 10        # engine 1 is done before the others
        assert parts[0].ready() and parts[0].data == {"i": 2, "me": 1}
        assert parts[0].stdout == "engine 1\\n"
        assert [p.engine for p in parts[1].stream(timeout=30)] == [2, 2, 2]
        assert parts[2].get_dict(timeout=30) == {3: 30}
        back = AsyncResult.join(parts[1:])
        assert back.engine_ids == [2, 3] and back.get(timeout=30) == [20, 30]
        assert AsyncResult.join(parts).get() == ar.get() == [10, 20, 30]
        try:
            AsyncResult.join([parts[0], c[1].apply_async(work, 0)])
            raise AssertionError("joined two tasks")
        except ValueError as e:
            assert "one task" in str(e), e
        print("DONE")
    """, nranks=4, timeout=60)
    assert job.returncode == 0, job.output
    assert "DONE" in job.stdout
