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
