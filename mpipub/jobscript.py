"""``mpipub jobscript``: write a SLURM batch script that runs a script under mpipub.

The script it prints is the one in ``jobscripts/`` with this environment filled in: the
absolute path of this Python (and of its ``mpiexec`` for ``--launcher mpiexec``), the job's
directory (``--chdir``, the current one by default, so the script and relative paths in its
arguments mean what they mean here) and the SLURM options. It refuses, in one line, what could
not work: fewer than 2 tasks, a time-limit warning that would come at once, ``srun --mpi=none``
or a PMI plugin the installed MPI does not speak.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import sysconfig
import textwrap

#: Seconds before the time limit at which SLURM sends SIGUSR1 (``--signal=B:USR1@LEAD``).
DEFAULT_SIGNAL_LEAD_S = 60

#: What the batch shell does after starting the launcher in the background: pass SLURM's
#: time-limit warning (SIGUSR1, sent to this shell only) on to the launcher, which passes it
#: to every rank; survive SIGTERM (scancel and the time limit send it to every task
#: themselves) and wait until the launcher has ended, so that rank 0 can close its files.
WAIT_FOR_LAUNCHER = """\
launcher=$!
wait "$launcher"; status=$?
while kill -0 "$launcher" 2>/dev/null; do wait "$launcher"; status=$?; done
exit "$status"
"""


class JobscriptError(ValueError):
    """An option that cannot give a working job; the message says which and why."""


def add_command(sub) -> None:
    j = sub.add_parser(
        "jobscript", help="print a SLURM batch script that runs SCRIPT under mpipub",
        description="Print a SLURM batch script that runs `python -m mpipub run SCRIPT ARGS` "
        "with this environment's python. Example: mpipub jobscript -n 64 -t 02:00:00 --sink "
        "run.h5 sim.py --steps 10000 > job.sh && sbatch job.sh")
    j.add_argument("-n", "--ntasks", type=int, default=5,
                   help="MPI ranks in all: rank 0 runs SCRIPT, the others are engines "
                   "(default 5)")
    j.add_argument("-N", "--nodes", metavar="N[-M]", help="nodes (sbatch --nodes)")
    j.add_argument("-t", "--time", metavar="LIMIT",
                   help="time limit, in sbatch's formats (MM, HH:MM:SS, D-HH:MM, ...)")
    j.add_argument("-p", "--partition", help="partition (sbatch --partition)")
    j.add_argument("-A", "--account", help="account (sbatch --account)")
    j.add_argument("-J", "--job-name", default=None, help="job name (default: mpipub-SCRIPT)")
    j.add_argument("-o", "--output", default="mpipub-%j.out",
                   help="job's stdout and stderr (default mpipub-%%j.out, in --chdir)")
    j.add_argument("--chdir", default=None,
                   help="directory the job runs in (default: the current one)")
    j.add_argument("--launcher", choices=("srun", "mpiexec"), default="srun",
                   help="srun (default), or the mpiexec beside this python inside the job")
    j.add_argument("--mpi", default=None,
                   help="srun's MPI plugin (default: the one this python's MPI needs, pmi2 "
                   "for MPICH, pmix for Open MPI; see `srun --mpi=list`)")
    j.add_argument("--sink", metavar="PATH", help="store every publication in this HDF5 file")
    j.add_argument("--signal-lead", type=int, default=DEFAULT_SIGNAL_LEAD_S, metavar="S",
                   help="SLURM sends SIGUSR1 this many seconds before the time limit; mpipub "
                   f"then ends the run cleanly (default {DEFAULT_SIGNAL_LEAD_S}; 0: no warning)")
    j.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="an extra #SBATCH line, e.g. --sbatch=--mem=8G (repeatable)")
    j.add_argument("script", help="the script rank 0 runs (relative to --chdir)")
    j.add_argument("args", nargs=argparse.REMAINDER, help="the script's arguments")
    j.set_defaults(func=cmd_jobscript)


def cmd_jobscript(args) -> int:
    try:
        text = render(args)
    except JobscriptError as exc:
        sys.stderr.write(f"mpipub jobscript: {exc}\n")
        return 2
    sys.stdout.write(text)
    return 0


_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<rest>\d+(?::\d+){0,2})$")


def time_limit_s(limit: str) -> int | None:
    """Seconds in an sbatch ``--time`` value (None for UNLIMITED); JobscriptError if malformed.

    sbatch reads "M", "M:S", "H:M:S", "D-H", "D-H:M" and "D-H:M:S"."""
    if limit.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.match(limit)
    if not m:
        raise JobscriptError(f"--time {limit!r}: not a SLURM time (MM, MM:SS, HH:MM:SS, "
                             "D-HH, D-HH:MM or D-HH:MM:SS)")
    parts = [int(x) for x in m["rest"].split(":")]
    if m["d"] is not None:  # D-H[:M[:S]]
        parts += [0] * (3 - len(parts))
        h, mi, s = parts
        return ((int(m["d"]) * 24 + h) * 60 + mi) * 60 + s
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def _pip_mpich() -> bool:
    """Whether mpi4py here uses pip's MPICH (the ``mpich`` wheel), which has no PMIx."""
    from importlib import metadata

    try:
        metadata.version("mpich")
    except metadata.PackageNotFoundError:
        return False
    try:  # the wheel is there; is it the MPI that mpi4py loads?
        import mpi4py

        mpi4py.rc.initialize = False
        from mpi4py import MPI

        return "MPICH" in MPI.Get_library_version()
    except Exception:  # noqa: BLE001 - only used to refuse a plugin that cannot work
        return False


def _mpiexec_beside(python: str) -> str | None:
    scripts = sysconfig.get_path("scripts")
    for d in (scripts, os.path.dirname(python)):
        p = os.path.join(d, "mpiexec")
        if os.access(p, os.X_OK):
            return p
    return None


def _directive_value(value: str) -> str:
    """A value for an #SBATCH line: sbatch splits those at whitespace unless double-quoted."""
    if '"' in value:
        raise JobscriptError(f"{value!r}: sbatch cannot take a double quote in an #SBATCH line")
    return f'"{value}"' if re.search(r"\s", value) else value


def render(args) -> str:
    """The batch script for ``args`` (the parsed options); JobscriptError if it cannot work."""
    if args.ntasks < 2:
        raise JobscriptError(f"-n {args.ntasks}: mpipub needs at least 2 tasks (task 0 runs "
                             "the script, the others are the engines)")
    if not 0 <= args.signal_lead <= 65535:
        raise JobscriptError(f"--signal-lead {args.signal_lead}: seconds from 0 to 65535")
    limit = time_limit_s(args.time) if args.time else None
    if limit is not None and limit <= 0:
        raise JobscriptError(f"--time {args.time}: a time limit must be positive")
    if limit is not None and args.signal_lead and args.signal_lead >= limit:
        raise JobscriptError(
            f"--signal-lead {args.signal_lead} is not shorter than the time limit "
            f"{args.time} ({limit} s): the warning would come as the job starts; give a "
            "longer --time or a shorter --signal-lead (0: none)")
    if args.nodes and re.fullmatch(r"\d+", args.nodes) and int(args.nodes) > args.ntasks:
        raise JobscriptError(f"-N {args.nodes} nodes for -n {args.ntasks} tasks: at least one "
                             "node would have no task")
    chdir = os.path.abspath(args.chdir or os.getcwd())
    if not os.path.isdir(chdir):
        raise JobscriptError(f"--chdir {chdir}: no such directory")
    if not os.path.isfile(os.path.join(chdir, args.script)):
        raise JobscriptError(f"no such script: {os.path.join(chdir, args.script)}")
    python = sys.executable
    if args.launcher == "srun":
        from .launcher import srun_mpi

        mpi = args.mpi or srun_mpi()
        plugin = mpi.lower()
        if plugin == "none":
            raise JobscriptError(
                "--mpi none: srun would start every task as its own one-rank MPI job (no "
                f"engines); give the PMI plugin of your MPI (this python's: {srun_mpi()})")
        if plugin.startswith("pmix") and _pip_mpich():
            raise JobscriptError(
                f"--mpi {args.mpi}: mpi4py here uses pip's MPICH ({python}), which has no "
                "PMIx; use --mpi pmi2, or --launcher mpiexec")
        launch = f"srun --mpi={shlex.quote(mpi)}"
    else:
        if args.mpi is not None:
            raise JobscriptError(f"--mpi {args.mpi} is srun's option; --launcher mpiexec "
                                 "starts the ranks with mpiexec")
        mpiexec = _mpiexec_beside(python)
        if mpiexec is None:
            raise JobscriptError(f"--launcher mpiexec: no mpiexec beside {python} (install "
                                 "mpipub's 'mpich' extra) ")
        # mpipub.launcher picks that mpiexec and adds what its MPI needs (Open MPI's flags),
        # decided inside the job, where the allocation is known
        launch = f'{shlex.quote(python)} -m mpipub.launcher -n "$SLURM_NTASKS"'
    name = args.job_name or "mpipub-" + os.path.splitext(os.path.basename(args.script))[0]
    run = [python, "-m", "mpipub", "run"]
    if args.sink:
        run += ["--sink", args.sink]
    run += [args.script, *args.args]
    command = " ".join(shlex.quote(a) for a in run)

    sb = [f"--job-name={name}", f"--ntasks={args.ntasks}"]
    if args.nodes:
        sb.append(f"--nodes={args.nodes}")
    if args.time:
        sb.append(f"--time={args.time}")
    if args.partition:
        sb.append(f"--partition={args.partition}")
    if args.account:
        sb.append(f"--account={args.account}")
    if args.signal_lead:
        sb.append(f"--signal=B:USR1@{args.signal_lead}")
    sb += [f"--chdir={_directive_value(chdir)}", f"--output={_directive_value(args.output)}",
           *args.sbatch]
    for line in sb:
        if "\n" in line:
            raise JobscriptError(f"{line!r}: one option per #SBATCH line")

    from . import __version__

    given = shlex.join(["mpipub", "jobscript", *sys.argv[2:]]) \
        if sys.argv[1:2] == ["jobscript"] else "mpipub jobscript"
    warn = (f"SLURM sends SIGUSR1 {args.signal_lead} s (give or take its 30-60 s resolution) "
            "before the time limit; this script passes it on" if args.signal_lead else
            "No time-limit warning was asked for (--signal-lead 0); a SIGUSR1 is passed on")
    about = (
        f"Written by `{given}` (mpipub {__version__}). Submit it with `sbatch FILE` (options "
        "given to sbatch win over the lines below). Rank 0 runs the script (the client); every "
        f"other rank is an engine. The job runs in {chdir}. {warn} to the launcher, which "
        "passes it to every rank: mpipub aborts the running tasks, closes the sink (the task "
        "marked cut short) and ends with status 138. scancel and the time limit itself send "
        "SIGTERM to every rank: the same, with status 143 (with Open MPI's mpiexec "
        "(--launcher mpiexec) the ranks are ended after it: see README, Open MPI)."
    )
    header = textwrap.fill(about, width=92, initial_indent="# ", subsequent_indent="# ",
                           break_on_hyphens=False, break_long_words=False)
    sbatch_lines = "\n".join("#SBATCH " + line for line in sb)
    return f"""#!/bin/bash
{header}
{sbatch_lines}

trap 'kill -USR1 "$launcher" 2>/dev/null' USR1
trap ':' TERM
{launch} {command} &
{WAIT_FOR_LAUNCHER}"""
