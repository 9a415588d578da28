"""Faults inside mpipub's own threads and settings, through real mpiexec jobs: what a user
sees when the engine's flusher thread, the sink's writer thread or rank 0's I/O thread dies;
an engine that is still in a task when its 10 s after SIGTERM are up; several sinks on one
runtime; many threads reading ``ar.data`` while engines publish; bad ``MPIPUB_*`` values.

Each fault is injected by patching mpipub inside the job's own script (the task's code on an
engine, the script on rank 0); MPI is real. Each test asserts what a user relies on: a clear
error naming what died and where, nothing already accepted lost, no hang, the job ends.
docs/endings.md lists these cases with what the user sees.
"""

from __future__ import annotations

import h5py
import pytest

import mpipub
from conftest import ok, run_mpi

pytestmark = pytest.mark.timeout(180)


# -- the engine's flusher thread dies -------------------------------------------------------------
FLUSHER = """
    import time
    from mpipub import Client, RemoteError

    c = Client()

    def break_flusher_then_publish(n):
        import threading, time
        from mpipub import publish_data
        from mpipub.engine.loop import current_engine
        sender = current_engine().sender
        real = sender._post_sealed

        def post_sealed():  # the fault: the flusher's next post raises (the task's works)
            if threading.current_thread().name == "mpipub-flusher":
                raise RuntimeError("injected flusher fault")
            real()

        sender._post_sealed = post_sealed
        for i in range(n):
            publish_data({"i": i})  # accepted: they wait in the open batch
        deadline = time.monotonic() + 60
        while sender.error is None:  # the flusher takes the batch after its linger and fails
            assert time.monotonic() < deadline, "the flusher did not fail"
            time.sleep(0.01)
        publish_data({"i": n})  # refused, with the reason

    N = 5
    ar = c[:].apply_async(break_flusher_then_publish, N)
    try:
        ar.get(timeout=60)
        raise SystemExit("the publication after the flusher's death was not refused")
    except RemoteError as e:
        print("REFUSED:", " | ".join(str(e).splitlines()), flush=True)
    # nothing accepted before the fault is lost: every step reached the client
    steps = {e: [] for e in c.ids}
    for p in ar.stream(timeout=30):
        steps[p.engine].append(p.step)
    assert steps == {e: list(range(N)) for e in c.ids}, steps
    assert ar.data == [{"i": N - 1}] * len(c.ids), ar.data
    # the engines keep running tasks: results go out on the task's thread
    assert c[:].apply_sync(lambda: 7) == [7] * len(c.ids)
    print("OK flusher", flush=True)
"""


def test_flusher_thread_dies(mpi_script):
    """Before the fix the failed flusher made the engine's drain() and result sends raise:
    the task's result never left the engine and rank 0 waited forever (a hang)."""
    job = mpi_script(FLUSHER, nranks=3, timeout=120)
    ok(job, "OK flusher")
    refused = next(line for line in job.stdout.splitlines() if line.startswith("REFUSED:"))
    for e in (1, 2):  # each engine's error says what died and where
        assert f"engine {e}, task 1, step 5" in refused, refused
    assert "flusher thread failed" in refused and "injected flusher fault" in refused, refused
    assert job.stderr.count("the engine's flusher thread failed") == 2, job.output
    assert "RuntimeError: injected flusher fault" in job.stderr, job.output


# -- the sink's writer thread dies ----------------------------------------------------------------
WRITER = """
    import time
    from mpipub import Client, MpipubError, RemoteError

    c = Client(sink="run.h5", overwrite=True)  # (engines serve inside Client(), then exit)
    import mpipub.sink.writer as writer

    def sim(n, first):
        import time
        from mpipub import publish_data
        for i in range(first, first + n):
            publish_data({"i": i})
            time.sleep(0.002)  # computing
        if first:  # the second task runs until the sink's failure aborts it
            while True:
                publish_data({"i": -1})
                time.sleep(0.002)

    assert c[:].apply_sync(sim, 20, 0) == [None, None]  # task 1: written and flushed

    real_write = writer.Sink._write

    def failing_write(self, batch):  # the fault: the writer fails on task 2's data
        tasks = {item[1] for item in batch if item[0] in ("data", "end")}
        if tasks == {2}:  # (once task 1 is all written: what was written before is known)
            raise OSError("injected writer fault")
        return real_write(self, batch)

    writer.Sink._write = failing_write
    ar = c[:].apply_async(sim, 10, 100)
    try:
        ar.get(timeout=60)
        raise SystemExit("task 2 was not stopped by the sink's failure")
    except RemoteError as e:
        print("TASK2:", " | ".join(str(e).splitlines()), flush=True)
    try:
        c[:].apply_async(sim, 1, 0)
        raise SystemExit("a new task was accepted with the sink broken")
    except MpipubError as e:
        print("NEW TASK:", e, flush=True)
    print("END", flush=True)
"""


def test_sink_writer_thread_dies(mpi_script, tmp_path):
    job = mpi_script(WRITER, nranks=3, timeout=120)
    assert "END" in job.stdout, job.output
    assert job.returncode == 1, job.output  # data was lost: the job says so
    err = job.stderr
    assert "writing sink file run.h5 failed" in err, job.output
    assert "OSError: injected writer fault" in err, job.output
    task2 = next(line for line in job.stdout.splitlines() if line.startswith("TASK2:"))
    assert "TaskAborted" in task2 and "writing sink file" in task2, task2
    new = next(line for line in job.stdout.splitlines() if line.startswith("NEW TASK:"))
    assert "no new tasks while the sink is broken" in new, new
    assert "exiting with status 1 because the sink failed" in err, job.output
    # what was written before stays readable, exact
    with mpipub.open(tmp_path / "run.h5") as run:
        assert 1 in run.tasks, run.tasks
        t1 = run.task(1)
        assert [list(v) for v in t1["i"]] == [list(range(20))] * 2
    with h5py.File(tmp_path / "run.h5", "r", swmr=True) as f:  # and with plain h5py
        for e in (1, 2):
            assert f[f"task_0001/engine_{e}/step"][:].tolist() == list(range(20))


# -- rank 0's I/O thread dies ---------------------------------------------------------------------
IOTHREAD = """
    import threading
    from mpipub import Client, MpipubError

    c = Client()  # (engines serve inside Client(), then exit: the fault is rank 0's)
    from mpipub.transport import wire

    def sim():
        import time
        from mpipub import publish_data
        i = 0
        while True:
            publish_data({"i": i})
            i += 1
            time.sleep(0.002)  # computing

    assert c[:].apply_sync(lambda: 1) == [1, 1]
    real_recv = wire.recv_message

    def failing_recv(*args, **kwargs):  # the fault: the I/O thread's next receive raises
        m = real_recv(*args, **kwargs)
        if m.kind == wire.DATA and m.step >= 10:
            raise RuntimeError("injected I/O thread fault")
        return m

    wire.recv_message = failing_recv
    ar = c[:].apply_async(sim)
    seen = {}

    def stream_reader():  # a second user thread, waiting in stream()
        try:
            for p in ar.stream():
                pass
            seen["stream"] = "ended without error"
        except MpipubError as e:
            seen["stream"] = f"MpipubError: {e}"

    th = threading.Thread(target=stream_reader)
    th.start()
    try:
        ar.get()  # no timeout: it must not wait forever
        raise SystemExit("get() returned after the I/O thread died")
    except MpipubError as e:
        print("GET:", e, flush=True)
    th.join(60)
    assert not th.is_alive(), "stream() still waits after the I/O thread died"
    print("STREAM:", seen["stream"], flush=True)
    try:
        c[:].apply_async(lambda: 1)
        raise SystemExit("a task was accepted after the I/O thread died")
    except MpipubError as e:
        print("SUBMIT:", e, flush=True)
    print("END", flush=True)
"""


def test_client_io_thread_dies(mpi_script):
    job = mpi_script(IOTHREAD, nranks=3, timeout=120)
    assert "END" in job.stdout, job.output
    lines = {line.split(":", 1)[0]: line for line in job.stdout.splitlines() if ":" in line}
    for what in ("GET", "STREAM", "SUBMIT"):
        assert "I/O thread failed" in lines[what], job.output
        assert "injected I/O thread fault" in lines[what], job.output
    assert "mpipub: the client's I/O thread failed:" in job.stderr, job.output
    # the engines cannot be stopped without it: the job ends, saying why
    assert "before engines [1, 2] stopped; aborting the MPI job" in job.stderr, job.output
    assert job.returncode != 0, job.output


# -- an engine still in a task when its 10 s after SIGTERM are up ---------------------------------
SIGTERM_DEADLINE = """
    import time
    from mpipub import Client, MpipubError, RemoteError

    c = Client()

    def ignores_sigterm():
        import os, signal, time
        from mpipub import TaskAborted, publish_data
        from mpi4py import MPI
        if MPI.COMM_WORLD.Get_rank() != 1:
            return "not signalled"
        publish_data({"i": 0})
        t0 = time.monotonic()
        caught = False
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # only engine 1 gets it; rank 0 does not
        except TaskAborted:
            caught = True  # the task swallows it and goes on
        while time.monotonic() - t0 < 10.5:  # computing past the engine's 10 s deadline
            try:
                time.sleep(0.05)
            except TaskAborted:
                caught = True  # the task swallows it and goes on
        return f"caught={caught}"

    assert c[:].apply_sync(ignores_sigterm) == ["caught=True", "not signalled"]
    # engine 1 leaves once idle: it says goodbye, and a task sent to it then is refused
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "engine 1 did not leave"
        try:
            c[1].apply_sync(lambda: 0)
        except RemoteError as e:  # sent as it left: the task fails, naming it
            assert e.ename == "EngineLeft" and "engine 1 left the job" in str(e), e
        except MpipubError as e:
            print("REFUSED:", " | ".join(str(e).splitlines()), flush=True)
            break
    assert c[2].apply_sync(lambda: 2) == 2  # the other engine goes on
    print("END", flush=True)
"""


def test_engine_leaves_10s_after_sigterm(mpi_script):
    """Before the fix engine 1 left silently without its goodbye: rank 0 then waited the
    close timeout and ended the job with MPI_Abort ("did not stop")."""
    job = mpi_script(SIGTERM_DEADLINE, nranks=3, timeout=120)
    ok(job, "END")
    assert "engine 1 (" in job.stderr and "got SIGTERM" in job.stderr, job.output
    line = next(x for x in job.stderr.splitlines() if "got SIGTERM" in x)
    assert "during task 1 (ignores_sigterm())" in line and "leaving" in line, line
    refused = next(x for x in job.stdout.splitlines() if x.startswith("REFUSED:"))
    assert "engine 1 has left" in refused, refused
    assert "did not stop within" not in job.stderr, job.output


# -- several sinks on one runtime -----------------------------------------------------------------
SINKS = """
    from mpipub import Client

    def sim(n):
        from mpipub import publish_data
        for i in range(n):
            publish_data({"i": i, "sq": i * i})

    a = Client(sink="a.h5", overwrite=True)
    assert a[:].apply_sync(sim, 30) == [None, None]          # task 1: a.h5
    b = Client(sink="b.h5", overwrite=True)                  # a second sink, same runtime
    assert b[:].apply_sync(sim, 40) == [None, None]          # task 2: both files
    assert a[1].apply_sync(sim, 50) is None                   # task 3: both files
    print("END", flush=True)
"""


def test_several_sinks_on_one_runtime(mpi_script, tmp_path):
    job = mpi_script(SINKS, nranks=3, timeout=120)
    ok(job, "END")
    expect = {"a.h5": {1: 30, 2: 40, 3: 50}, "b.h5": {2: 40, 3: 50}}
    for name, tasks in expect.items():
        with h5py.File(tmp_path / name, "r") as f:  # closed cleanly: plain h5py opens it
            assert "closed" in f.attrs, name
        with mpipub.open(tmp_path / name) as run:
            assert run.tasks == sorted(tasks), (name, run.tasks)
            for t, n in tasks.items():
                engines = [1] if t == 3 else [1, 2]
                got = run.task(t)
                assert got.engines == engines, (name, t, got.engines)
                assert [list(v) for v in got["i"]] == [list(range(n))] * len(engines), (name, t)
                assert [list(v) for v in got["sq"]] == [[i * i for i in range(n)]] * len(
                    engines), (name, t)


# -- many threads reading ar.data while engines publish -------------------------------------------
READERS = """
    import threading
    import numpy as np
    from mpipub import Client

    c = Client()

    def sim(n):
        import time
        import numpy as np
        from mpipub import publish_data
        a = np.zeros(500)  # 4 KiB: every step fits the history stream() reads from
        for i in range(n):
            a[:] = i
            publish_data({"i": i, "a": a, "sq": i * i, "s": f"step {i}"})
            if i % 50 == 0:
                time.sleep(0.001)  # computing now and then
        return n

    N = 3000
    ar = c[:].apply_async(sim, N)
    problems, reads = [], [0] * 5

    def check(d, where):
        i = d["i"]
        if not (d["sq"] == i * i and d["s"] == f"step {i}" and d["a"].shape == (500,)
                and np.all(d["a"] == i)):
            problems.append(f"{where}: inconsistent dict at step {i}")
        return i

    def data_reader(k):
        last = [-1] * len(c.ids)
        try:
            while True:
                done = ar.ready()  # read once more after the end
                for j, d in enumerate(ar.data):
                    if d:
                        i = check(d, f"reader {k}")
                        if i < last[j]:
                            problems.append(f"reader {k}: engine {c.ids[j]} went back "
                                            f"from step {last[j]} to {i}")
                        last[j] = i
                reads[k] += 1
                if done:
                    break
            if last != [N - 1] * len(c.ids):
                problems.append(f"reader {k} ended at steps {last}")
        except Exception as e:
            problems.append(f"reader {k} raised {e!r}")

    def stream_reader():
        last = {}
        try:
            for p in ar.stream(timeout=60):
                check(p.data, "stream")
                if p.step != last.get(p.engine, -1) + 1:
                    problems.append(f"stream: engine {p.engine} step {p.step} after "
                                    f"{last.get(p.engine)}")
                last[p.engine] = p.step
                reads[4] += 1
        except Exception as e:
            problems.append(f"stream raised {e!r}")

    threads = [threading.Thread(target=data_reader, args=(k,)) for k in range(4)]
    threads.append(threading.Thread(target=stream_reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a reader did not finish"
    assert ar.get() == [N, N]
    assert not problems, problems[:10]
    assert reads[4] == 2 * N, reads
    print("OK readers", reads, flush=True)
"""


def test_concurrent_data_readers(mpi_script):
    job = mpi_script(READERS, nranks=3, timeout=150)
    ok(job, "OK readers")


# -- bad MPIPUB_* values --------------------------------------------------------------------------
def _bad_values(kind: str) -> list[str]:
    return {"seconds": ["0", "-1", "abc", "nan", "inf", ""],
            "count": ["0", "-5", "1.5", "1e3x", ""],
            "bool": ["maybe", "2", "-1"]}[kind]


def test_every_setting_refuses_bad_values_in_one_line(monkeypatch):
    """Every MPIPUB_* variable: a bad value is a ConfigError whose message is one line,
    naming the variable, the value and what it accepts."""
    from mpipub import config
    from mpipub.errors import ConfigError

    for name, s in config.SETTINGS.items():
        for bad in _bad_values(s.kind):
            monkeypatch.setenv(name, bad)
            with pytest.raises(ConfigError) as info:
                config.get(name)
            msg = str(info.value)
            assert "\n" not in msg, msg
            assert msg.startswith(f"{name}={bad!r}: expected "), msg
            assert s.accepts() in msg, msg
        monkeypatch.delenv(name)
        assert config.get(name) == s.default


@pytest.mark.parametrize("name,value,run", [
    ("MPIPUB_CLIENT_POLL_MAX_S", "0", False),  # read on rank 0 (the I/O thread)
    ("MPIPUB_LINGER_S", "soon", False),  # read on every rank (the engine's flusher)
    ("MPIPUB_MAX_OUTSTANDING_BYTES", "4M", True),  # read on engines, under `mpipub run`
], ids=["client-poll", "linger", "outstanding-bytes-mpipub-run"])
def test_a_job_started_with_a_bad_setting_ends_with_its_name(tmp_path, name, value, run):
    """The variables test_api.py's job test does not cover: the job ends non-zero, before the
    script's work, naming the variable and what it accepts."""
    script = tmp_path / "s.py"
    script.write_text("from mpipub import Client\nc = Client()\nprint('SHOULD NOT GET HERE')\n")
    pre = ["-m", "mpipub", "run"] if run else []
    job = run_mpi(2, [*pre, str(script)], env={name: value}, timeout=60)
    assert job.returncode != 0, job.output
    assert "SHOULD NOT GET HERE" not in job.stdout
    assert f"{name}={value!r}: expected " in job.stderr, job.output
    if run:  # `mpipub run` says it in one line (per rank), without a traceback (Open MPI's
        # launcher adds its own box about the non-zero exit: not ours)
        assert "Traceback" not in job.stderr, job.stderr
        lines = [x for x in job.stderr.strip().splitlines() if x.startswith("mpipub")]
        assert lines and all(x.startswith(f"mpipub run: {name}={value!r}: expected ")
                             for x in lines), job.stderr
