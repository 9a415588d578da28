"""Batch jobs on a real SLURM: the job scripts in jobscripts/, `mpipub jobscript`, scancel and
time limits, and the `srun --mpi=none` launch mistake.

They need a running SLURM whose node can run 3 tasks (`.ci/slurm.sh start` sets one up on this
machine; `.ci/run` does so in CI) and skip, saying why, where there is none. Every job is
submitted from a directory outside the repository, waited for under a deadline and cancelled
in a finally clause, so a failing test leaves no job queued or running.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import MPI_FLAVOUR, ROOT, mpi_env

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(180)]

JOBSCRIPTS = ROOT / "jobscripts"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
NTASKS = 3  # rank 0 and two engines
#: srun's PMI plugin for the MPI under test (mpipub.launcher.srun_mpi): Open MPI 5 speaks PMIx
#: only (SLURM's pmix plugin needs libpmix, which .ci/slurm.sh installs), pip's MPICH PMI-2.
PLUGIN = "pmix" if MPI_FLAVOUR == "openmpi" else "pmi2"


def _slurm_missing() -> str | None:
    """Why SLURM cannot run jobs here, or None."""
    for cmd in ("sbatch", "scontrol", "scancel", "squeue"):
        if shutil.which(cmd) is None:
            return f"no `{cmd}` on PATH (start a local SLURM: .ci/slurm.sh install && start)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "`scontrol ping` did not answer within 15 s"
    if "is UP" not in ping.stdout:
        return ("no SLURM controller answers `scontrol ping` (start a local one: "
                ".ci/slurm.sh start)")
    return None


_WHY_NOT = _slurm_missing()
if _WHY_NOT and not os.environ.get("MPIPUB_REQUIRE_SLURM"):
    pytestmark.append(pytest.mark.skip(reason=f"SLURM tests: {_WHY_NOT}"))


@pytest.fixture(autouse=True)
def _slurm_running():
    """Where SLURM must run (MPIPUB_REQUIRE_SLURM=1, as .ci/run sets), its absence fails."""
    if _WHY_NOT:
        pytest.fail(f"MPIPUB_REQUIRE_SLURM is set but {_WHY_NOT}")

# A user script: every engine publishes `steps` steps of {"a": [rank*1000 + i] * 3, "i": i},
# sleeping `sleep` s between them, then the client prints what came back, with its argv.
SIM = """\
    import argparse, sys
    from mpipub import Client

    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--tag", default="")
    a = p.parse_args()
    c = Client()

    def work(n, pause):
        import time
        import numpy as np
        from mpi4py import MPI
        from mpipub import publish_data
        r = MPI.COMM_WORLD.Get_rank()
        for i in range(n):
            publish_data({"a": np.full(3, r * 1000.0 + i), "i": i})
            if pause:
                time.sleep(pause)
        return n

    print("client ready", flush=True)
    print(f"results {c[:].apply_sync(work, a.steps, a.sleep)} tag={a.tag} argv={sys.argv[1:]}",
          flush=True)
"""


class Jobs:
    """Submits jobs and guarantees (finally) that none outlives the test."""

    def __init__(self, env: dict):
        self.env = env
        self.ids: list[str] = []

    def submit(self, args: list[str], cwd: Path) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=self.env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"sbatch {args} failed: {out.stderr}"
        job = out.stdout.strip().split(";")[0]
        self.ids.append(job)
        return job

    def info(self, job: str) -> dict:
        """The job's fields from `scontrol show job` (empty once SLURM has forgotten it)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True,
                             text=True, timeout=15)
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}

    def wait(self, job: str, timeout: float) -> dict:
        """Wait (under a deadline) for the job to end; return its final fields."""
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            info = self.info(job)
            if info.get("JobState") in FINAL_STATES:
                return info
            last = info or last
            if not info:  # forgotten already (MinJobAge)? then the completion log has it
                done = self._from_jobcomp(job)
                if done:
                    return done
            time.sleep(0.2)
        pytest.fail(f"job {job} did not end within {timeout} s (last seen: "
                    f"{last.get('JobState')}); it is cancelled")

    def _from_jobcomp(self, job: str) -> dict:
        conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                              timeout=15).stdout
        m = re.search(r"JobCompLoc\s*=\s*(\S+)", conf)
        if not (m and "jobcomp/filetxt" in conf and os.path.isfile(m[1])):
            return {}
        for line in Path(m[1]).read_text().splitlines():
            if line.startswith(f"JobId={job} "):
                return dict(re.findall(r"(\w+)=(\S*)", line))
        return {}

    def wait_running(self, job: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.info(job).get("JobState")
            if state == "RUNNING":
                return
            assert state not in FINAL_STATES, f"job {job} ended ({state}) before it ran"
            time.sleep(0.2)
        pytest.fail(f"job {job} did not start within {timeout} s")

    def cancel_all(self) -> None:
        if self.ids:
            subprocess.run(["scancel", *self.ids], capture_output=True, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if not any(self.info(j).get("JobState") in ("PENDING", "RUNNING", "COMPLETING",
                                                            "SUSPENDED") for j in self.ids):
                    break
                time.sleep(0.2)


@pytest.fixture
def jobs():
    """A Jobs whose environment runs this python: its directory first on PATH (so `python3`
    in the job is this one, as after `source venv/bin/activate`)."""
    env = mpi_env()
    env.pop("MPIPUB_PYTHON", None)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    j = Jobs(env)
    try:
        yield j
    finally:
        j.cancel_all()


@pytest.fixture
def workdir(tmp_path):
    """A submit directory outside the repository, holding the user's script."""
    d = tmp_path / "submit here"  # a space in the path: quoting must hold
    d.mkdir()
    (d / "sim.py").write_text(textwrap.dedent(SIM))
    return d


def _output(path: Path) -> str:
    return path.read_text() if path.exists() else "(no output file)"


def _check_complete(job: dict, out: Path, steps: int, tag: str) -> None:
    text = _output(out)
    assert job.get("JobState") == "COMPLETED", f"{job.get('JobState')}\n{text}"
    assert job.get("ExitCode") == "0:0", f"{job.get('ExitCode')}\n{text}"
    assert f"results {[steps] * (NTASKS - 1)} tag={tag}" in text, text
    # (pip's Open MPI under srun --mpi=pmix: no PMIx help-file stub, comm._pmix_native_security)
    assert "Sorry!" not in text, text


def _check_sink(path: Path, steps: int | None = None, at_least: int = 1, closed: bool = True):
    """Every engine's steps are 0..k without a gap, each value exact, the file closed cleanly
    (unless ``closed`` is False); returns the task."""
    import mpipub

    with mpipub.open(path) as run:
        assert run.closed_cleanly or not closed, f"{path} was not closed cleanly"
        task = run.task(run.tasks[-1])
        assert task.engines == list(range(1, NTASKS)), task.engines
        for e in task.engines:
            st, a = task.engine(e).series(("a",))
            n = len(st)
            if steps is not None:
                assert n == steps, f"engine {e}: {n} steps stored, {steps} published"
            assert n >= at_least, f"engine {e}: {n} steps stored, at least {at_least} expected"
            np.testing.assert_array_equal(st, np.arange(n))
            np.testing.assert_array_equal(a, e * 1000.0 + np.arange(n)[:, None] * np.ones(3))
            _, i = task.engine(e).series(("i",))
            np.testing.assert_array_equal(np.asarray(i), np.arange(n))
        return {"cut_short": task.cut_short, "engines": {
            e: len(task.engine(e).steps) for e in task.engines}}


def _wait_live_steps(path: Path, n: int, job: str, jobs: Jobs, timeout: float) -> int:
    """Read the sink with mpipub.open while the job writes it, until every engine has n steps;
    returns the fewest steps an engine had then."""
    import mpipub
    from mpipub.sink.reader import SinkFileError

    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        assert jobs.info(job).get("JobState") not in FINAL_STATES, "the job ended early"
        if path.exists():
            try:
                with mpipub.open(path) as run:
                    if run.tasks:
                        task = run.task(run.tasks[-1])
                        counts = [len(task.engine(e).steps) for e in task.engines]
                        if len(counts) == NTASKS - 1:
                            seen = min(counts)
                            if seen >= n:
                                return seen
            except SinkFileError:
                pass  # being created
        time.sleep(0.2)
    pytest.fail(f"the running job's sink did not reach {n} steps per engine within "
                f"{timeout} s (saw {seen})")


# -- the templates ---------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["mpipub.sbatch", "mpipub-mpiexec.sbatch"])
def test_template_runs_any_script_with_its_args_from_any_dir(template, jobs, workdir):
    """sbatch TEMPLATE [mpipub run options] SCRIPT ARGS, from a directory outside the repo;
    the python comes from PATH (the srun one) or MPIPUB_PYTHON (the mpiexec one)."""
    if template.startswith("mpipub-mpiexec"):
        jobs.env["MPIPUB_PYTHON"] = sys.executable
        jobs.env["PATH"] = os.environ.get("PATH", "")  # no python3 of this venv on PATH
    out = workdir / "job.out"
    job = jobs.submit([f"--ntasks={NTASKS}", "--time=5", f"--output={out}",
                       str(JOBSCRIPTS / template), "--sink", "run.h5", "sim.py",
                       "--steps", "7", "--tag", "two words"], cwd=workdir)
    info = jobs.wait(job, 120)
    _check_complete(info, out, 7, "two words")
    assert _check_sink(workdir / "run.h5", steps=7)["cut_short"] is None


def test_template_without_mpipub_python_says_so(jobs, workdir):
    """A python without mpipub: one line naming MPIPUB_PYTHON, status 2, nothing launched."""
    jobs.env["MPIPUB_PYTHON"] = "/nonexistent/bin/python3"
    jobs.env["PATH"] = "/usr/bin:/bin"
    out = workdir / "job.out"
    job = jobs.submit([f"--ntasks={NTASKS}", "--time=5", f"--output={out}",
                       str(JOBSCRIPTS / "mpipub.sbatch"), "sim.py"], cwd=workdir)
    info = jobs.wait(job, 60)
    text = _output(out)
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "2:0", (info, text)
    assert "MPIPUB_PYTHON" in text and len(text.strip().splitlines()) == 1, text


# -- mpipub jobscript ------------------------------------------------------------------------

@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_generated_script_runs(launcher, jobs, workdir, tmp_path):
    """`mpipub jobscript ... > job.sh`, then `sbatch job.sh` from yet another directory: the
    job runs where the script was generated, with this python baked in (PATH has none)."""
    gen = subprocess.run(
        [sys.executable, "-m", "mpipub", "jobscript", "-n", str(NTASKS), "-t", "00:05:00",
         "--launcher", launcher, "--sink", "gen.h5", "--sbatch=--comment=mpipub-test",
         "sim.py", "--steps", "6", "--tag", "x y"],
        cwd=workdir, env=jobs.env, capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    script = workdir / "job.sh"
    script.write_text(gen.stdout)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    jobs.env["PATH"] = "/usr/bin:/bin"
    job = jobs.submit([str(script)], cwd=elsewhere)
    info = jobs.wait(job, 120)
    _check_complete(info, workdir / f"mpipub-{job}.out", 6, "x y")
    assert info.get("Comment") == "mpipub-test", info
    assert _check_sink(workdir / "gen.h5", steps=6)["cut_short"] is None


# -- scancel and the time limit ----------------------------------------------------------------

@pytest.mark.parametrize("template", ["mpipub.sbatch", "mpipub-mpiexec.sbatch"])
def test_scancel_cuts_the_run_short_and_keeps_the_file(template, jobs, workdir):
    """scancel (SIGTERM to every rank) while engines publish: the job is CANCELLED, rank 0
    says once why and where each engine was, and the sink is closed cleanly with every step
    up to the signal, its task marked cut short (Open MPI's mpiexec: see below)."""
    out = workdir / "job.out"
    job = jobs.submit([f"--ntasks={NTASKS}", "--time=5", f"--output={out}",
                       str(JOBSCRIPTS / template), "--sink", "run.h5", "sim.py",
                       "--steps", "1000000", "--sleep", "0.02"], cwd=workdir)
    seen = _wait_live_steps(workdir / "run.h5", 20, job, jobs, timeout=90)
    subprocess.run(["scancel", job], check=True, timeout=30)
    info = jobs.wait(job, 60)
    text = _output(out)
    assert info.get("JobState") == "CANCELLED", (info, text)
    if template == "mpipub-mpiexec.sbatch" and MPI_FLAVOUR == "openmpi":
        # Open MPI's mpiexec gets scancel's SIGTERM too, exits at once and its daemons end the
        # ranks: rank 0's line is lost and the file may be left as after SIGKILL, readable
        # up to its last flush (docs/endings.md; mpipub.sbatch, srun, keeps it all)
        _check_sink(workdir / "run.h5", at_least=seen, closed=False)
        return
    cut = [ln for ln in text.splitlines() if "job cut short" in ln]
    assert len(cut) == 1 and "SIGTERM" in cut[0], text
    assert re.search(r"engine 1 at step \d+, engine 2 at step \d+", cut[0]), cut[0]
    assert "results" not in text, text
    sink = _check_sink(workdir / "run.h5", at_least=seen)
    assert sink["cut_short"] and "SIGTERM" in sink["cut_short"], sink
    info_cli = subprocess.run([sys.executable, "-m", "mpipub", "info", "run.h5"], cwd=workdir,
                              capture_output=True, text=True, timeout=60)
    assert "cut short: " in info_cli.stdout and "SIGTERM" in info_cli.stdout, info_cli.stdout


def test_time_limit_warning_ends_the_run_cleanly(jobs, workdir):
    """A one-minute job with a 15 s SIGUSR1 lead: SLURM checks every 30 s and sends it when
    fewer than lead + 30 s are left, so 15-45 s in (measured here: a 20 s lead came 11-34 s
    in), after the client started and before the limit. The run ends before the limit,
    FAILED with exit code 138 (128 + SIGUSR1), and the file holds every step up to the
    signal, the task cut short by SIGUSR1."""
    gen = subprocess.run(
        [sys.executable, "-m", "mpipub", "jobscript", "-n", str(NTASKS), "-t", "1",
         "--signal-lead", "15", "--sink", "run.h5", "-o", "job.out", "sim.py",
         "--steps", "1000000", "--sleep", "0.02"],
        cwd=workdir, env=jobs.env, capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    assert "#SBATCH --signal=B:USR1@15" in gen.stdout
    (workdir / "job.sh").write_text(gen.stdout)
    job = jobs.submit(["job.sh"], cwd=workdir)
    info = jobs.wait(job, 150)
    text = _output(workdir / "job.out")
    assert info.get("JobState") == "FAILED" and info.get("ExitCode") == "138:0", (info, text)
    cut = [ln for ln in text.splitlines() if "job cut short" in ln]
    assert len(cut) == 1 and "SIGUSR1" in cut[0], text
    sink = _check_sink(workdir / "run.h5", at_least=1)
    assert sink["cut_short"] and "SIGUSR1" in sink["cut_short"], sink


# -- launch mistakes -------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["mpipub run", "Client()"])
def test_srun_mpi_none_says_so_once(how, jobs, workdir):
    """srun --mpi=none gives pip's MPICH (and Open MPI) N one-rank worlds: one error for the
    whole job, naming the fix, and no task runs the script as a client."""
    cmd = "python3 -m mpipub run sim.py" if how == "mpipub run" else "python3 sim.py"
    (workdir / "none.sh").write_text(f"#!/bin/bash\nsrun --mpi=none {cmd}\n")
    out = workdir / "job.out"
    job = jobs.submit([f"--ntasks={NTASKS}", "--time=5", f"--output={out}", "none.sh"],
                      cwd=workdir)
    info = jobs.wait(job, 90)
    text = _output(out)
    assert info.get("JobState") == "FAILED", (info, text)
    assert text.count("world of one rank") == 1, text
    assert f"--mpi={PLUGIN}" in text and "mpi4py against the cluster's MPI" in text, text
    assert "client ready" not in text and "results" not in text, text


# -- the notebook kernel ---------------------------------------------------------------------

KERNEL_DRIVER = """\
    # Runs inside the batch job, as Jupyter would: start the kernel, run one cell, shut down.
    import sys
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    from mpipub.notebook import ports
    km = KernelManager(kernel_name="mpipub-slurm",
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[sys.argv[1]]))
    ports.pin(km)  # ports srun's and MPI's start-up cannot take
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=90)
        out = []
        def hook(msg):
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
        cell = ("import os\\nfrom mpipub import Client\\nc = Client()\\n"
                "print('cell ran on task', os.environ.get('SLURM_PROCID'), 'engines', c.ids, "
                "'got', c[:].apply_sync(lambda: __import__('os').environ['SLURM_PROCID']))")
        reply = kc.execute_interactive(cell, timeout=60, output_hook=hook)
        print("status", reply["content"]["status"], "".join(out), flush=True)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
"""


def test_notebook_kernel_started_with_srun_inside_an_allocation(jobs, workdir):
    """`mpipub kernel install --mpiexec "srun --mpi=pmi2"` (Open MPI: pmix): inside an
    allocation the kernel is
    rank 0 of an srun step and its engines are the step's other tasks; a cell uses them."""
    try:
        import mpipub.notebook.kernelspec  # noqa: F401
    except ImportError:
        pytest.skip("mpipub.notebook is not here (the notebook kernel, issue 13)")
    pytest.importorskip("jupyter_client")
    pytest.importorskip("ipykernel")
    prefix = workdir / "prefix"
    r = subprocess.run([sys.executable, "-m", "mpipub", "kernel", "install", "--engines",
                        str(NTASKS - 1), "--name", "mpipub-slurm", "--mpiexec",
                        f"srun --mpi={PLUGIN}", "--prefix", str(prefix)],
                       capture_output=True, text=True, timeout=60, env=jobs.env)
    assert r.returncode == 0, r.stderr
    (workdir / "driver.py").write_text(textwrap.dedent(KERNEL_DRIVER))
    kernels = prefix / "share" / "jupyter" / "kernels"
    (workdir / "kernel.sh").write_text(
        f"#!/bin/bash\n{sys.executable} driver.py '{kernels}'\n")
    out = workdir / "job.out"
    job = jobs.submit([f"--ntasks={NTASKS}", "--time=5", f"--output={out}", "kernel.sh"],
                      cwd=workdir)
    info = jobs.wait(job, 150)
    text = _output(out)
    assert info.get("JobState") == "COMPLETED", (info, text)
    assert "status ok cell ran on task 0 engines [1, 2] got ['1', '2']" in text, text
