"""How a job ends: the script finishing, raising or calling sys.exit on rank 0; Ctrl-C and
SIGTERM while engines are busy; a task that never publishes; a job with one rank.

Both launch styles are covered: ``mpiexec -n N python script.py`` (the script calls Client() on
every rank) and ``mpiexec -n N python -m mpipub run script.py`` (the script runs on rank 0).
Each job is checked to leave no process behind *before* the fixture's kill_group runs. MPICH's
hydra starts every rank in its own session, so "the job's processes" are mpiexec's descendants
(found through /proc) as well as its process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time

import pytest

from conftest import MPI_FLAVOUR, PYTHON, finish, mpi_env, proc_table, start_mpi, wait_for_file

END_BOUND_S = 10.0  # a signalled job must be gone within this many seconds


# -- processes of a job, through /proc -----------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, int, str, int]]:
    """pid -> (ppid, pgid, state, start time) of every process."""
    return {pid: (ppid, pgid, state, start)
            for pid, (ppid, pgid, _sid, state, start) in proc_table().items()}


def _job_processes(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root`` and member of its group."""
    table = _proc_table()
    out = {}
    for pid, (_ppid, pgid, _state, start) in table.items():
        p, seen = pid, 0
        while p > 1 and seen < 64:
            if p == root:
                break
            p = table.get(p, (0,))[0]
            seen += 1
        if (p == root or pgid == root) and pid != root:
            out[pid] = start
    return out


def _still_running(procs: dict[int, int]) -> list[int]:
    table = _proc_table()
    return [pid for pid, start in procs.items()
            if pid in table and table[pid][3] == start and table[pid][2] != "Z"]


def _kill(procs: dict[int, int]) -> None:
    for pid in _still_running(procs):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _write(tmp_path, code: str, name="script.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return path


def _launch(tmp_path, nranks, code, args=(), run=False, env=None) -> subprocess.Popen:
    path = _write(tmp_path, code)
    pre = ["-m", "mpipub", "run"] if run else []
    return start_mpi(nranks, [*pre, str(path), *args], env=env, cwd=tmp_path)


def _end_and_check(proc, procs, nranks, action=None, bound=END_BOUND_S):
    """Do ``action`` (send a signal), wait for mpiexec to exit within ``bound`` seconds, check
    that none of ``procs`` is left, and return (Job, seconds from action to exit)."""
    assert len(procs) >= nranks, f"expected {nranks} ranks among the job's processes: {procs}"
    t0 = time.monotonic()
    if action is not None:
        action()
    try:
        proc.wait(timeout=bound + 20)
    except subprocess.TimeoutExpired:
        pass
    left = _still_running(procs)
    # let the kernel reap what just exited; under Open MPI the ranks outlive mpiexec after a
    # signal (it exits at once while rank 0 closes the job), so they get the whole bound
    deadline = time.monotonic() + 1.0
    if MPI_FLAVOUR == "openmpi":
        deadline = max(deadline, t0 + bound)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _still_running(procs)
    took = time.monotonic() - t0
    _kill(procs)
    job = finish(proc, 10)
    assert took < bound, f"job took {took:.1f} s to end (bound {bound} s):\n{job.output}"
    assert not left, f"processes {left} of the job outlived mpiexec:\n{job.output}"
    return job, took


# -- the script ends: normally, by an exception, by sys.exit ---------------------------------------
ENDING = """
    import sys, time
    from pathlib import Path
    from mpipub import Client

    def wait_for(path):  # a condition, under a deadline
        deadline = time.monotonic() + 60
        while not Path(path).exists():
            assert time.monotonic() < deadline, f'no {path}'
            time.sleep(0.01)

    c = Client()
    mode = sys.argv[1]
    assert c[:].apply_sync(lambda: 7) == [7, 7]
    Path('ready').touch()
    wait_for('go')  # the test has listed the job's processes
    if mode == 'raise':
        raise ValueError('script failed here')
    if mode == 'exit3':
        sys.exit(3)
    if mode == 'hang':
        def never_publishes():
            import time
            from mpi4py import MPI
            open(f'started{MPI.COMM_WORLD.Get_rank()}', 'w').close()
            time.sleep(600)  # a long computation
        ar = c[:].apply_async(never_publishes)
        wait_for('started1')  # both engines are inside the task: an abort cannot reach it
        wait_for('started2')
    print('END', mode, flush=True)
"""


@pytest.mark.parametrize("run", [False, True], ids=["script", "mpipub-run"])
@pytest.mark.parametrize("mode", ["ok", "raise", "exit3", "hang"])
def test_script_end(tmp_path, mode, run):
    env = {"MPIPUB_CLOSE_TIMEOUT_S": "1"} if mode == "hang" else None
    proc = _launch(tmp_path, 3, ENDING, [mode], run=run, env=env)
    wait_for_file(tmp_path / "ready", proc)
    job, took = _end_and_check(proc, _job_processes(proc.pid), 3,
                               lambda: (tmp_path / "go").touch())
    out = job.output
    if mode == "ok":
        assert job.returncode == 0, out
        assert "END ok" in job.stdout, out
    elif mode == "raise":
        assert job.returncode == 1, out
        assert out.count("ValueError: script failed here") == 1, out
        assert out.count("Traceback (most recent call last)") == 1, out
        # the script's own frames, as `python script.py` prints them: no runner or runpy
        assert "runner.py" not in out and "runpy" not in out, out
    elif mode == "exit3":
        assert job.returncode == 3, out
        assert "Traceback" not in out, out
    else:  # a task that never publishes cannot be aborted: MPI_Abort after the close timeout
        assert "END hang" in job.stdout, out
        assert "still runs on engines [1, 2]; aborting it" in job.stderr, out
        assert "engines [1, 2] did not stop within 1.0 s" in job.stderr, out
        assert job.returncode != 0, out


# -- signals while engines are busy ---------------------------------------------------------------
BUSY = """
    import os, sys, time
    from pathlib import Path

    if os.environ.get("RANK0_STDERR") and os.environ.get("OMPI_COMM_WORLD_RANK") == "0":
        # what rank 0 says after Open MPI's mpiexec has exited (it no longer forwards output)
        os.dup2(os.open(os.environ["RANK0_STDERR"], os.O_WRONLY | os.O_CREAT), 2)

    from mpipub import Client, publish_data

    c = Client()

    def sleeper():
        publish_data({'started': 1})
        time.sleep(600)

    def publisher():
        import numpy as np
        a = np.zeros(5000)  # 40 kB: header and raw buffer travel separately
        while True:
            publish_data({'a': a, 'small': 1})
            a += 1

    ar = c[:].apply_async(sleeper if sys.argv[1] == 'sleep' else publisher)
    while not all(s.publications for s in ar.stats.values()):
        time.sleep(0.01)
    Path('ready').touch()
    ar.get()
"""


def _send(proc, sig, to_group):
    def action():
        if to_group:
            os.killpg(proc.pid, sig)  # like Ctrl-C in a terminal: mpiexec's whole group
        else:
            os.kill(proc.pid, sig)
    return action


@pytest.mark.parametrize("busy", ["sleep", "publish"])
@pytest.mark.parametrize("sig,to_group,run", [
    (signal.SIGINT, False, False),
    (signal.SIGTERM, False, False),
    (signal.SIGINT, True, False),
    (signal.SIGINT, True, True),
    (signal.SIGTERM, False, True),
], ids=["INT-mpiexec", "TERM-mpiexec", "INT-group", "INT-group-mpipub-run",
        "TERM-mpiexec-mpipub-run"])
def test_signal_while_engines_busy_ends_the_whole_job(tmp_path, sig, to_group, run, busy):
    nranks = 4
    rank0_err = tmp_path / "rank0.err"
    proc = _launch(tmp_path, nranks, BUSY, [busy], run=run, env={"RANK0_STDERR": str(rank0_err)})
    wait_for_file(tmp_path / "ready", proc)
    procs = _job_processes(proc.pid)
    job, took = _end_and_check(proc, procs, nranks, _send(proc, sig, to_group))
    if MPI_FLAVOUR == "openmpi":
        # Open MPI's mpiexec: every rank gets SIGTERM (SIGINT too becomes SIGTERM), mpiexec
        # exits with status 1 at once; rank 0 starts its shutdown (on its own stderr:
        # mpiexec is gone) and every rank ends within the bound. Rank 0 usually finishes it
        # ("job cut short"), but Open MPI may kill it when another rank exits first
        # (docs/endings.md), so that line is not required here.
        assert job.returncode == 1, f"status {job.returncode}, took {took:.1f} s\n{job.output}"
        said = rank0_err.read_text()
        assert "mpipub: closing while task 1 (" in said, (said, job.output)
        assert "job cut short: rank 0 got SIGTERM" in said or said.count("\n") == 1, said
    else:
        expected = 130 if sig == signal.SIGINT else 143
        assert job.returncode == expected, \
            f"status {job.returncode}, took {took:.1f} s\n{job.output}"
        said = job.stderr
    assert "did not stop within" not in said, (said, job.output)
    assert "I/O thread failed" not in said, (said, job.output)


# -- one rank: no engines --------------------------------------------------------------------------
@pytest.mark.parametrize("launcher", ["mpiexec-n1", "python"])
@pytest.mark.parametrize("run", [False, True], ids=["script", "mpipub-run"])
def test_one_rank_is_a_clear_launch_error(tmp_path, launcher, run):
    path = _write(tmp_path, """
        from mpipub import Client
        c = Client()
        print('SHOULD NOT GET HERE')
    """)
    args = [*(["-m", "mpipub", "run"] if run else []), str(path)]
    if launcher == "python":
        proc = subprocess.Popen([PYTHON, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=mpi_env(), cwd=tmp_path, start_new_session=True)
    else:
        proc = start_mpi(1, args, cwd=tmp_path)
    job = finish(proc, 60)
    assert job.returncode != 0, job.output
    assert "SHOULD NOT GET HERE" not in job.stdout
    # a LaunchError traceback (script) or one line from `mpipub run`, said once
    assert job.stderr.count("mpipub found a single MPI rank, so there are no engines") == 1, \
        job.output
    assert "at least 2 ranks" in job.stderr and "mpiexec -n 5 python script.py" in job.stderr
    if not run:
        assert "mpipub.errors.LaunchError: mpipub found a single MPI rank" in job.stderr
