"""Test helpers: every MPI job runs in its own session, with a timeout, and is killed (its
process group, and every process of its session or below mpiexec: Open MPI gives each rank a
group of its own) if it outlives it, so a bug fails a test instead of hanging CI. Jobs start
through mpipub.launcher, so the suite runs under MPICH and Open MPI (MPI_FLAVOUR says which)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpipub import launcher

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MPIEXEC = launcher.find_mpiexec(PYTHON)
#: "mpich" or "openmpi": where the two MPIs really differ, tests assert each one's documented
#: behaviour (README "Open MPI", docs/endings.md)
MPI_FLAVOUR = launcher.mpi_flavour(PYTHON)


@dataclass
class Job:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def ok(job: Job, *markers: str) -> None:
    """The job exited 0 and printed every marker."""
    assert job.returncode == 0, f"exit {job.returncode}\n{job.output}"
    for m in markers:
        assert m in job.stdout, f"{m!r} missing\n{job.output}"


def mpi_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["MPLBACKEND"] = "Agg"
    if extra:
        env.update(extra)
    return env


def proc_table() -> dict[int, tuple[int, int, int, str, int]]:
    """pid -> (ppid, process group, session, state, start time) of every process (/proc)."""
    table = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            table[int(d)] = (int(fields[1]), int(fields[2]), int(fields[3]), fields[0],
                             int(fields[19]))
    return table


def _session_and_descendants(root: int) -> list[int]:
    """Processes in ``root``'s session (start_new_session made mpiexec its leader) or below
    it. Open MPI starts each rank in a process group of its own, inside mpiexec's session,
    and leaves ranks running when mpiexec exits on a signal, so the group is not enough."""
    table = {pid: (ppid, sid) for pid, (ppid, _pgid, sid, state, _start) in proc_table().items()
             if state != "Z"}  # (a zombie is gone, only not yet reaped)
    found = {pid for pid, (_ppid, sid) in table.items() if sid == root}
    grew = True
    while grew:
        new = {pid for pid, (ppid, _sid) in table.items() if ppid in found or ppid == root}
        grew = not new <= found
        found |= new
    found.discard(root)
    return sorted(found)


def kill_group(proc: subprocess.Popen) -> None:
    """Kill the whole job: mpiexec's process group, and every process in its session or
    below it (mpiexec and every rank, under MPICH and Open MPI)."""
    others = _session_and_descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in others:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_mpi(nranks: int, args: list[str], *, env: dict | None = None, cwd=None,
              stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    """Start `mpiexec -n nranks python ARGS` (with what this MPI needs: mpipub.launcher) in a
    new process group."""
    assert MPIEXEC, "mpiexec not found (pip install mpich)"
    cmd = launcher.mpiexec_command(nranks, [PYTHON, *args], mpiexec=MPIEXEC)
    return subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, env=mpi_env(env),
                            cwd=cwd, start_new_session=True)


#: How long finish() lets ranks outlive mpiexec before it kills them: Open MPI's mpiexec exits
#: at once on SIGTERM/SIGINT while rank 0 still closes the job (README, "Open MPI").
OUTLIVE_S = 30.0


def wait_for_ranks(proc: subprocess.Popen, timeout: float = OUTLIVE_S) -> list[int]:
    """After mpiexec has exited: wait until no process of its job is left (at most
    ``timeout`` s); return those still there."""
    deadline = time.monotonic() + timeout
    left = set(_session_and_descendants(proc.pid))  # (only these: mpiexec's pid is free now)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left &= set(_session_and_descendants(proc.pid))
    return sorted(left)


def finish(proc: subprocess.Popen, timeout: float) -> Job:
    t0 = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
        wait_for_ranks(proc)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        pytest.fail(f"MPI job did not finish within {timeout} s (killed its process group)\n"
                    f"--- stdout ---\n{out}\n--- stderr ---\n{err}")
    finally:
        kill_group(proc)  # no rank may outlive the job
    return Job(proc.returncode, out, err, time.monotonic() - t0)


def run_mpi(nranks: int, args: list[str], *, timeout: float = 60, env: dict | None = None,
            cwd=None) -> Job:
    """Run an MPI job to its end; fail the test (after killing it) if it exceeds timeout."""
    return finish(start_mpi(nranks, args, env=env, cwd=cwd), timeout)


def wait_until(condition, timeout: float, what: str, interval: float = 0.02):
    """Wait until ``condition()`` is true (returning its value), looking every ``interval``
    seconds; fail the test naming ``what`` after ``timeout`` seconds. Tests wait on
    conditions like this, never on a sleep of a guessed length."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_for_file(path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Wait until a running job creates ``path`` (its "ready" mark); fail the test with the
    job's output (after killing it) if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            job = finish(proc, 10)
            pytest.fail(f"job ended (status {job.returncode}) before {path.name}:\n{job.output}")
        if time.monotonic() > deadline:
            kill_group(proc)
            job = finish(proc, 10)
            pytest.fail(f"job not ready after {timeout} s:\n{job.output}")
        time.sleep(0.02)


@pytest.fixture
def mpi_script(tmp_path):
    """Write a script (dedented) to tmp_path and run it under mpiexec.

    Usage: ``job = mpi_script(code, nranks=3, args=[...], timeout=60, run=False)``; with
    ``run=True`` it is launched as ``python -m mpipub run script``.
    """
    counter = {"n": 0}

    def _run(code: str, nranks: int = 3, args: list[str] | None = None, timeout: float = 60,
             run: bool = False, env: dict | None = None) -> Job:
        counter["n"] += 1
        path = tmp_path / f"script{counter['n']}.py"
        path.write_text(textwrap.dedent(code))
        pre = ["-m", "mpipub", "run"] if run else []
        return run_mpi(nranks, [*pre, str(path), *(args or [])], timeout=timeout, env=env,
                       cwd=tmp_path)

    return _run
