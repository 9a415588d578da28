"""`mpipub jobscript` (what it writes and what it refuses), the shipped job scripts' syntax, and
the launch mistake of N one-rank worlds: all without SLURM (tests/test_slurm.py submits)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import MPI_FLAVOUR, ROOT, mpi_env
from mpipub.jobscript import time_limit_s

#: srun's PMI plugin for the MPI under test: Open MPI 5 speaks PMIx only, pip's MPICH PMI-2.
PLUGIN = "pmix" if MPI_FLAVOUR == "openmpi" else "pmi2"


def jobscript(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpipub", "jobscript", *args], cwd=cwd,
                          env=mpi_env(), capture_output=True, text=True, timeout=60)


@pytest.fixture
def sim(tmp_path):
    (tmp_path / "sim.py").write_text("print('hi')\n")
    return tmp_path


def test_generated_script_has_the_options_and_this_python(sim):
    r = jobscript(["-n", "64", "-N", "2", "-t", "02:00:00", "-p", "batch", "-A", "proj",
                   "--sink", "run.h5", "--signal-lead", "120", "--sbatch=--mem=8G",
                   "sim.py", "--steps", "10", "--name", "a b"], sim)
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for line in ("#SBATCH --ntasks=64", "#SBATCH --nodes=2", "#SBATCH --time=02:00:00",
                 "#SBATCH --partition=batch", "#SBATCH --account=proj",
                 "#SBATCH --signal=B:USR1@120", f"#SBATCH --chdir={sim}", "#SBATCH --mem=8G",
                 "#SBATCH --job-name=mpipub-sim"):
        assert line in text.splitlines(), f"{line!r} missing:\n{text}"
    assert (f"srun --mpi={PLUGIN} {sys.executable} -m mpipub run --sink run.h5 sim.py --steps 10 "
            "--name 'a b' &") in text, text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_generated_mpiexec_script_uses_the_mpiexec_beside_this_python(sim):
    """Through mpipub.launcher, run by this python: the mpiexec beside it, with what its MPI
    needs decided inside the job."""
    r = jobscript(["--launcher", "mpiexec", "sim.py"], sim)
    assert r.returncode == 0, r.stderr
    launch = [ln for ln in r.stdout.splitlines() if "-m mpipub run" in ln]
    assert len(launch) == 1, r.stdout
    assert launch[0].startswith(f'{sys.executable} -m mpipub.launcher -n "$SLURM_NTASKS" '
                                f'{sys.executable} -m mpipub run '), launch
    from mpipub import launcher

    cmd = launcher.mpiexec_command(4, ["x"])
    assert os.path.isabs(cmd[0]) and os.access(cmd[0], os.X_OK), cmd


@pytest.mark.parametrize("args, says", [
    (["-n", "1", "sim.py"], "-n 1: mpipub needs at least 2 tasks"),
    (["-t", "1", "sim.py"], "--signal-lead 60 is not shorter than the time limit"),
    (["-t", "1:xx", "sim.py"], "--time '1:xx': not a SLURM time"),
    (["--mpi", "none", "sim.py"], "--mpi none: srun would start every task as its own"),
    (["-N", "3", "-n", "2", "sim.py"], "-N 3 nodes for -n 2 tasks"),
    (["--signal-lead", "-5", "sim.py"], "--signal-lead -5: seconds from 0 to 65535"),
    (["--launcher", "mpiexec", "--mpi", "pmix", "sim.py"], "--mpi pmix is srun's option"),
    (["nosuch.py"], "no such script:"),
])
def test_refusals_are_one_line(sim, args, says):
    r = jobscript(args, sim)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "", r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpipub jobscript: ") and says in lines[0], \
        r.stderr


def test_pmix_refused_with_pips_mpich(sim):
    from importlib import metadata

    try:
        metadata.version("mpich")
    except metadata.PackageNotFoundError:
        pytest.skip("pip's mpich is not installed here")
    r = jobscript(["--mpi", "pmix", "sim.py"], sim)
    assert r.returncode == 2 and "pip's MPICH" in r.stderr and "pmi2" in r.stderr, r.stderr


@pytest.mark.parametrize("limit, seconds", [
    ("5", 300), ("5:30", 330), ("1:00:00", 3600), ("2-0", 172800), ("1-2:03", 93780),
    ("1-0:0:5", 86405), ("UNLIMITED", None)])
def test_time_limit_formats(limit, seconds):
    assert time_limit_s(limit) == seconds


@pytest.mark.parametrize("name", ["mpipub.sbatch", "mpipub-mpiexec.sbatch"])
def test_shipped_job_scripts_parse_and_set_a_warning(name):
    path = ROOT / "jobscripts" / name
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "#SBATCH --signal=B:USR1@" in path.read_text()
    assert not (ROOT / "jobscripts" / "slurm_simulation.sbatch").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["mpipub run", "Client()"])
def test_tasks_that_each_see_a_world_of_one_say_so_once(tmp_path, how):
    """What srun --mpi=none does with pip's MPICH, without SLURM: 3 processes started with
    SLURM's task variables and no PMI, each a one-rank MPI job. Task 0 prints the error once,
    the others exit 1 without a word; none runs the script as a client."""
    (tmp_path / "sim.py").write_text("from mpipub import Client\nClient()\nprint('client ready')\n")
    cmd = ["-m", "mpipub", "run", "sim.py"] if how == "mpipub run" else ["sim.py"]
    procs = []
    try:
        for k in range(3):
            env = mpi_env({"SLURM_STEP_NUM_TASKS": "3", "SLURM_NTASKS": "3",
                           "SLURM_PROCID": str(k)})
            for var in list(env):
                if var.startswith(("PMI_", "PMIX_", "OMPI_", "HYDRA_", "MPIR_")):
                    del env[var]
            procs.append(subprocess.Popen([sys.executable, *cmd], cwd=tmp_path, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True))
        results = [p.communicate(timeout=45) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    codes = [p.returncode for p in procs]
    outs = [o + e for o, e in results]
    assert codes[0] != 0 and codes[1:] == [1, 1], (codes, outs)
    assert outs[0].count("world of one rank") == 1 and f"--mpi={PLUGIN}" in outs[0], outs[0]
    assert outs[1:] == ["", ""], outs
    assert not any("client ready" in o for o in outs), outs


@pytest.mark.timeout(60)
def test_a_deliberate_one_rank_run_gets_the_plain_error(tmp_path):
    """One process under SLURM (srun -n 1, or python in the batch shell): not the N-worlds
    error, the usual one."""
    (tmp_path / "sim.py").write_text("print('client ready')\n")
    env = mpi_env({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"})
    for var in list(env):
        if var.startswith(("PMI_", "PMIX_", "OMPI_", "HYDRA_")):
            del env[var]
    r = subprocess.run([sys.executable, "-m", "mpipub", "run", "sim.py"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=45)
    assert r.returncode == 2 and "single MPI rank" in r.stderr, r.stderr
    assert "client ready" not in r.stdout


def test_launcher_names_the_srun_plugin_of_this_mpi():
    """The job scripts ask `python -m mpipub.launcher --srun-mpi` which plugin to give srun."""
    r = subprocess.run([sys.executable, "-m", "mpipub.launcher", "--srun-mpi"], env=mpi_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == PLUGIN, (r.stdout, r.stderr)
    r = subprocess.run([sys.executable, "-m", "mpipub.launcher", "true"], env=mpi_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "-n N is required" in r.stderr, r.stderr
