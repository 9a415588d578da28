"""The ``mpipub`` command line: ``run`` a script under MPI, ``jobscript`` (a SLURM batch
script for it), (with a sink file) ``info``, ``plot`` and ``watch``, and ``kernel
install|list|remove`` for Jupyter."""

from __future__ import annotations

import argparse
import sys


def _parser(sink_commands: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpipub", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run SCRIPT on rank 0 with engines on every other rank",
                       description="Start under MPI: mpiexec -n 5 python -m mpipub run "
                       "script.py [args]. The script runs on rank 0 only.")
    r.add_argument("--sink", metavar="PATH", help="store every publication in this HDF5 file")
    r.add_argument("--sink-overwrite", action="store_true", help="replace an existing sink file")
    r.add_argument("--sink-flush", type=float, metavar="S", help="sink flush interval (s)")
    r.add_argument("--sink-compression", metavar="NAME", help="gzip, lzf (or hdf5plugin's)")
    r.add_argument("--sink-include", action="append", metavar="PATTERN",
                   help="store only keys matching this fnmatch pattern (repeatable)")
    r.add_argument("--sink-exclude", action="append", metavar="PATTERN",
                   help="do not store keys matching this pattern (repeatable)")
    r.add_argument("script")
    r.add_argument("args", nargs=argparse.REMAINDER)
    if sink_commands:  # not needed to start a run (start-up time counts on every rank)
        from . import jobscript
        from .sink import sinkcli

        jobscript.add_command(sub)
        sinkcli.add_commands(sub)
        from .notebook import kernelspec

        kernelspec.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpipub`` and ``python -m mpipub``."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser(sink_commands=argv[:1] != ["run"]).parse_args(argv)
    if args.command == "run":
        from .client.ending import install_signal_handlers
        from .runner import run_script

        # at once: SLURM's time-limit warning (SIGUSR1) may come before Client() is made,
        # and its default action kills the process without closing anything
        install_signal_handlers()

        opts = {"overwrite": True} if args.sink_overwrite else {}
        for name, opt in (("sink_flush", "flush_interval"), ("sink_compression", "compression"),
                          ("sink_include", "include"), ("sink_exclude", "exclude")):
            if getattr(args, name, None) is not None:
                opts[opt] = getattr(args, name)
        if opts and not args.sink:
            sys.stderr.write("mpipub run: sink options need --sink PATH\n")
            return 2
        try:
            return run_script(args.script, args.args, sink=args.sink, sink_options=opts)
        except Exception as exc:  # noqa: BLE001 - e.g. the sink file exists: one line
            from .errors import MpipubError

            if not isinstance(exc, MpipubError):
                raise
            sys.stderr.write(f"mpipub run: {exc}\n")
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
