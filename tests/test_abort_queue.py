"""ar.abort() on queued tasks (issue 18, bug 1): a task aborted before it starts never runs,
however many tasks wait before it on the same engine, and whether the abort comes at once
or while earlier tasks run. Each job counts exactly which tasks ran."""

from __future__ import annotations

from conftest import ok


def test_aborting_many_queued_tasks_at_once_skips_every_one(mpi_script):
    job = mpi_script("""
        import time
        from mpipub import Client, RemoteError
        c = Client()
        def nap(i, s):
            import time
            time.sleep(s)
            return i
        for n in (4, 20):
            ars = [c[1].apply_async(nap, i, 0.2) for i in range(n)]
            for ar in ars[1:]:
                ar.abort()
            ran, aborted = [], []
            for i, ar in enumerate(ars):
                try:
                    assert ar.get(timeout=30) == i
                    ran.append(i)
                except RemoteError as e:
                    assert e.ename == 'TaskAborted', e
                    aborted.append(i)
            print(f'{n} queued: ran {ran}')
            assert ran == [0] and aborted == list(range(1, n)), (ran, aborted)
        # the engine serves on
        assert c[1].apply_sync(lambda: 'alive') == 'alive'
        print('OK at once')
    """, nranks=2, timeout=90)
    ok(job, "OK at once")


def test_aborting_queued_tasks_after_a_delay_skips_every_one_not_started(mpi_script):
    job = mpi_script("""
        import time
        from mpipub import Client, RemoteError
        c = Client()
        def nap(i, s):
            import time
            time.sleep(s)
            return i
        ars = [c[1].apply_async(nap, i, 0.5) for i in range(10)]
        assert ars[2].get(timeout=30) == 2      # tasks 0-2 ran; 3 runs now or is about to
        for ar in ars[3:]:
            ar.abort()
        outcome = {}
        for i, ar in enumerate(ars):
            try:
                ar.get(timeout=30)
                outcome[i] = 'ran'
            except RemoteError as e:
                assert e.ename == 'TaskAborted', e
                outcome[i] = 'aborted'
        print('outcome', outcome)
        assert [outcome[i] for i in range(3)] == ['ran'] * 3, outcome
        # task 3 may have started before its abort arrived (it never publishes, so it then
        # runs to its end); every later one starts >= 0.5 s after its abort was sent
        assert [outcome[i] for i in range(4, 10)] == ['aborted'] * 6, outcome
        print('OK delayed')
    """, nranks=2, timeout=90)
    ok(job, "OK delayed")
