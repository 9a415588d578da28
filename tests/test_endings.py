"""What survives what: every way a job with a sink ends, and what it leaves behind.

Each case is a real ``mpiexec`` job whose engines publish while the job ends; afterwards the
sink file must open with plain h5py (no SWMR flags, no ``h5clear``), say it was closed, and
hold every step up to the last one rank 0 received (the step rank 0 names in its "job cut
short" line), values exact. docs/endings.md is the table these tests check.
"""

from __future__ import annotations

import os
import re
import signal
import textwrap

import h5py
import numpy as np
import pytest

from conftest import MPI_FLAVOUR, finish, kill_group, run_mpi, start_mpi, wait_for_file

SIM = """
    import os, sys, time
    from pathlib import Path
    from mpipub import Client

    mode, launch = sys.argv[1], sys.argv[2]
    sink = None if launch == "run" else "run.h5"

    def sim():
        from mpipub import publish_data
        import numpy as np, time
        i = 0
        while True:
            publish_data({"a": np.full(16, i, dtype=np.int64), "i": i})
            i += 1
            time.sleep(0.001)

    def body(c):
        ar = c[:].apply_async(sim)
        while not all(s.publications > 20 for s in ar.stats.values()):
            time.sleep(0.01)
        Path("ready.tmp").write_text(str(os.getpid()))
        os.replace("ready.tmp", "ready")  # appears whole: the test reads the pid at once
        if mode == "exit3":
            sys.exit(3)
        if mode == "raise":
            raise ValueError("the script failed here")
        if mode == "close":
            c.close()
            return
        if mode in ("end", "with"):
            return
        ar.get()  # the test signals the job meanwhile

    if mode == "with":
        with Client(sink=sink) as c:
            body(c)
    else:
        body(Client(sink=sink))
"""

#: mode -> (how the test ends the job, exit status, what rank 0 says cut the task short)
ENDINGS = {
    "end": (None, 0, "the client closed"),
    "with": (None, 0, "the client closed"),
    "close": (None, 0, "the client closed"),
    "exit3": (None, 3, "the client closed"),
    "raise": (None, 1, "the client closed"),
    "TERM": ((signal.SIGTERM, False), 143, "rank 0 got SIGTERM"),
    "USR1": ((signal.SIGUSR1, False), 138, "rank 0 got SIGUSR1"),
    "INT-group": ((signal.SIGINT, True), 130, "rank 0 got Ctrl-C"),
    "TERM-group": ((signal.SIGTERM, True), 143, "rank 0 got SIGTERM"),
}


#: Open MPI's mpiexec turns SIGTERM and SIGINT into "terminate the job": every rank gets
#: SIGTERM (never SIGINT), and mpiexec exits with status 1 at once, no longer forwarding output,
#: while rank 0 still closes the job (README, "Open MPI"; docs/endings.md).
OPENMPI_SIGNALLED = (1, "rank 0 got SIGTERM")


def expected_ending(mode: str) -> tuple[int, str]:
    """(exit status, what rank 0 says cut the task short) under this suite's MPI."""
    _how, status, cut = ENDINGS[mode]
    if MPI_FLAVOUR == "openmpi" and mode in ("TERM", "INT-group", "TERM-group"):
        return OPENMPI_SIGNALLED
    return status, cut


def check_openmpi_signalled_file(path, stderr: str, engines=(1, 2)) -> None:
    """After SIGTERM/SIGINT to Open MPI's mpiexec: usually complete and closed, the task cut
    short by SIGTERM; when Open MPI killed rank 0 before it had closed the file (it may, once
    another rank has exited: docs/endings.md), as after SIGKILL: readable in SWMR mode, every
    stored step consecutive and exact."""
    with h5py.File(path, "r", swmr=True) as f:
        closed = "closed" in f.attrs
    if closed:
        check_sink_file(path, stderr, OPENMPI_SIGNALLED[1], engines, line_lost=True)
        return
    with h5py.File(path, "r", swmr=True) as f:
        for e in engines:
            g = f[f"task_0001/engine_{e}"]
            n = min(g["step"].shape[0], g["data/a"].shape[0], g["data/i"].shape[0])
            assert n > 0, (e, stderr)
            assert g["step"][:n].tolist() == list(range(n))
            assert np.array_equal(g["data/a"][:n], np.repeat(np.arange(n), 16).reshape(n, 16))


def check_sink_file(path, stderr: str, cut: str | None, engines=(1, 2),
                    line_lost: bool = False) -> dict:
    """The file opens without SWMR, was closed, and holds every step up to the step rank 0
    named for each engine, exactly (``line_lost``: rank 0's line never reached us, as under
    Open MPI after a signal to mpiexec; then every step stored, consecutive and exact).
    Returns {engine: number of steps}."""
    with h5py.File(path, "r") as f:  # plain h5py: the end-of-file check is on
        assert "closed" in f.attrs, stderr
        g = f["task_0001"]
        named = {}
        if cut is not None:
            assert cut in str(g.attrs.get("cut_short")), (dict(g.attrs), stderr)
            line = [ln for ln in stderr.splitlines() if "job cut short" in ln]
            assert len(line) == 1 or (line_lost and not line), stderr
        if cut is not None and line:
            named = {int(e): int(s) for e, s in re.findall(r"engine (\d+) at step (\d+)",
                                                            line[0])}
            assert sorted(named) == list(engines), line
        if cut is None:
            assert "cut_short" not in g.attrs
        counts = {}
        for e in engines:
            eg = g[f"engine_{e}"]
            n = eg["step"].shape[0]
            assert n > 20, (e, n, stderr)
            if named:
                assert n == named[e] + 1, (e, n, named, stderr)
            assert eg["step"][:].tolist() == list(range(n))
            assert eg["index"][0]["name"] == b"a" and eg["index"][0]["first"] == 0  # dense
            a = eg["data/a"][:]
            assert a.shape == (n, 16) and np.array_equal(a, np.repeat(np.arange(n), 16)
                                                         .reshape(n, 16)), (e, stderr)
            assert eg["data/i"][:].tolist() == list(range(n))
            counts[e] = n
        assert np.isfinite(g.attrs["end"])
    return counts


@pytest.mark.parametrize("launch", ["script", "run"], ids=["python-script", "mpipub-run"])
@pytest.mark.parametrize("mode", list(ENDINGS))
def test_every_ending_leaves_a_complete_closed_file(tmp_path, mode, launch):
    how = ENDINGS[mode][0]
    status, cut = expected_ending(mode)
    if how is not None and launch == "run" and mode == "with":
        pytest.skip("n/a")
    script = tmp_path / "sim.py"
    script.write_text(textwrap.dedent(SIM))
    script_mode = mode if how is None else "wait"
    pre = ["-m", "mpipub", "run", "--sink", "run.h5"] if launch == "run" else []
    proc = start_mpi(3, [*pre, str(script), script_mode, launch], cwd=tmp_path)
    try:
        wait_for_file(tmp_path / "ready", proc)
        if how is not None:
            sig, group = how
            (os.killpg if group else os.kill)(proc.pid, sig)
        job = finish(proc, 60)
    finally:
        kill_group(proc)
    assert job.returncode == status, f"status {job.returncode}\n{job.output}"
    assert "Exception ignored" not in job.stderr, job.output
    assert "Traceback" not in job.stderr or mode in ("raise", "INT-group"), job.output
    if (status, cut) == OPENMPI_SIGNALLED:
        check_openmpi_signalled_file(tmp_path / "run.h5", job.stderr)
    else:
        check_sink_file(tmp_path / "run.h5", job.stderr, cut)


ENDS_AFTER_TASK = """
    import sys
    from mpipub import Client
    c = Client(sink="run.h5", overwrite=True)
    dv = c[:]
    def f():
        from mpipub import publish_data
        publish_data({"x": 1})
        global result
        result = 5
    dv.apply_sync(f)
    if sys.argv[1] == "pull":
        assert dv.pull("result", block=True) == [5, 5]
"""


def test_a_sink_script_that_just_ends_20_times(tmp_path):
    """README's pattern, no close(): the shutdown must not depend on atexit order (h5py's
    handler, registered at its first import inside Client(sink=), used to run first)."""
    script = tmp_path / "ends.py"
    script.write_text(textwrap.dedent(ENDS_AFTER_TASK))
    for i in range(20):
        variant = "pull" if i % 2 else "apply"
        job = run_mpi(3, [str(script), variant], cwd=tmp_path, timeout=60)
        assert job.returncode == 0, f"run {i} ({variant}): status {job.returncode}\n{job.output}"
        assert "mpipub:" not in job.stderr, f"run {i}: {job.output}"
        with h5py.File(tmp_path / "run.h5", "r") as f:
            assert "closed" in f.attrs, f"run {i}"
            for e in (1, 2):
                assert f[f"task_0001/engine_{e}/data/x"][:].tolist() == [1], f"run {i}"
            assert np.isfinite(f["task_0001"].attrs["end"])
            assert "cut_short" not in f["task_0001"].attrs


def test_close_waits_for_a_sink_that_is_still_writing(tmp_path):
    """A slow disk is not a hung engine: close() waits (saying so) past its timeout while
    the sink makes progress, the abort reaches engines meanwhile, and every step lands."""
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent("""
        import time
        from mpipub import Client
        c = Client(sink="run.h5", _delay_s=0.01, max_queue_items=32)
        def pub():
            from mpipub import publish_data
            import numpy as np
            i = 0
            while True:
                publish_data({"a": np.full(16, i, dtype=np.int64), "i": i})
                i += 1
        ar = c[:].apply_async(pub)
        while not all(s.publications > 200 for s in ar.stats.values()):
            time.sleep(0.01)
        c.close()
        print("CLOSED", ar.ready(), flush=True)
    """))
    job = run_mpi(3, [str(script)], cwd=tmp_path, timeout=120,
                  env={"MPIPUB_CLOSE_TIMEOUT_S": "1", "MPIPUB_MAX_OUTSTANDING_COUNT": "64"})
    assert job.returncode == 0, job.output
    assert "did not stop within" not in job.stderr, job.output
    assert "CLOSED True" in job.stdout, job.output
    assert "waiting for the sink to write" in job.stderr, job.output
    check_sink_file(tmp_path / "run.h5", job.stderr, "the client closed")


STRAY = """
    from mpipub import Client
    c = Client()

    def leaves_a_thread():
        import builtins, threading, time
        import numpy as np
        from mpipub import publish_data
        builtins.stray_errors = []
        builtins.stray_stop = False
        def loop():
            while not builtins.stray_stop:
                try:
                    publish_data({"stray": np.zeros(4)})
                except Exception as exc:
                    builtins.stray_errors.append(str(exc))
                time.sleep(0.001)
        threading.Thread(target=loop, name="bg", daemon=True).start()
        publish_data({"mine": 1})

    def next_task():
        import time
        import numpy as np
        from mpipub import publish_data
        for i in range(100):
            publish_data({"x": np.full(4, i)})
            time.sleep(0.002)

    def stop_the_thread():
        import builtins
        builtins.stray_stop = True
        return len(builtins.stray_errors), builtins.stray_errors[:1]

    c[:].apply_sync(leaves_a_thread)
    ar = c[:].apply_async(next_task)
    keys = {k for pub in ar.stream() for k in pub.data}
    print("STREAM KEYS", sorted(keys))
    print("DATA KEYS", sorted({k for d in ar.data for k in d}))
    for n, first in c[:].apply_sync(stop_the_thread):
        print("REFUSED", n > 0, first[0] if first else None)
"""


def test_a_thread_that_outlives_its_task_never_publishes_into_the_next(mpi_script):
    job = mpi_script(STRAY, nranks=3, timeout=60)
    assert job.returncode == 0, job.output
    assert "STREAM KEYS ['x']" in job.stdout, job.output
    assert "DATA KEYS ['x']" in job.stdout, job.output
    refused = [ln for ln in job.stdout.splitlines() if ln.startswith("REFUSED")]
    assert len(refused) == 2 and all(ln.startswith("REFUSED True publish_data() called from "
                                                   "thread 'bg', which task 1") for ln in refused)
    for e in (1, 2):
        warn = f"mpipub: engine {e}: thread 'bg', started by task 1 (leaves_a_thread())"
        assert job.stderr.count(warn) == 1, job.output


DIES = """
    import sys
    from mpipub import Client
    c = Client()
    def dies(how):
        import ctypes, os
        if how == "exit":
            os._exit(3)
        ctypes.string_at(0)  # a segfault
    c[2].apply_sync(dies, sys.argv[1])
    print("SHOULD NOT GET HERE")
"""


@pytest.mark.parametrize("how", ["exit", "segfault"])
def test_an_engine_that_dies_says_which_and_in_which_task(mpi_script, how):
    job = mpi_script(DIES, nranks=3, args=[how], timeout=60)
    assert job.returncode != 0, job.output
    assert "SHOULD NOT GET HERE" not in job.stdout
    if how == "exit":
        assert "mpipub: engine 2 (" in job.stderr, job.output
        assert "is exiting with os._exit(3) during task 1 (dies())" in job.stderr, job.output
    else:
        assert "Fatal Python error: Segmentation fault" in job.stderr, job.output
        assert re.search(r"in <task 1 dies\(\) on engine 2 \(", job.stderr), job.output


def test_sigterm_again_while_closing_is_not_raised_into_the_shutdown(tmp_path):
    """scancel's SIGTERM reaches the job (mpiexec forwards it: each rank gets it twice), and
    rank 0 gets more while it closes: noted, never raised into the shutdown. (Signalling
    mpiexec itself twice is different: hydra then forces the abort.)"""
    script = tmp_path / "sim.py"
    script.write_text(textwrap.dedent(SIM))
    proc = start_mpi(3, [str(script), "wait", "script"], cwd=tmp_path)
    try:
        wait_for_file(tmp_path / "ready", proc)
        rank0 = int((tmp_path / "ready").read_text())
        os.killpg(proc.pid, signal.SIGTERM)
        for _ in range(3):
            try:
                os.kill(rank0, signal.SIGTERM)
            except ProcessLookupError:
                break
        job = finish(proc, 60)
    finally:
        kill_group(proc)
    status, cut = expected_ending("TERM-group")
    assert job.returncode == status, job.output
    assert "Exception ignored" not in job.stderr, job.output
    if (status, cut) == OPENMPI_SIGNALLED:
        check_openmpi_signalled_file(tmp_path / "run.h5", job.stderr)
    else:
        check_sink_file(tmp_path / "run.h5", job.stderr, cut)


LATE_SIGNAL = """
    import atexit, os, signal, time
    from mpipub import Client
    def late_sigterm():  # after mpipub's end of rank 0 (atexit runs after it): a forwarded
        # SIGTERM that arrives this late must not kill rank 0 in Python's teardown
        print("ignored after the end:", signal.getsignal(signal.SIGTERM) is signal.SIG_IGN,
              flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        print("still here", flush=True)
    c = Client()  # (engines serve here and never return: rank 0 alone goes on)
    atexit.register(late_sigterm)
    c[:].apply_sync(lambda: None)
"""


def test_a_signal_after_the_end_of_rank_0_is_ignored(mpi_script):
    job = mpi_script(LATE_SIGNAL, nranks=3, timeout=60)
    assert job.returncode == 0, job.output
    assert "ignored after the end: True" in job.stdout and "still here" in job.stdout, job.output
    assert "again while closing" not in job.stderr, job.output
