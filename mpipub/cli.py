"""The ``mpipub`` command line: ``run`` a script under MPI, and (with a sink file)
``info``, ``plot`` and ``watch``."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpipub", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run SCRIPT on rank 0 with engines on every other rank",
                       description="Start under MPI: mpiexec -n 5 python -m mpipub run "
                       "script.py [args]. The script runs on rank 0 only.")
    r.add_argument("--sink", metavar="PATH", help="store every publication in this HDF5 file")
    r.add_argument("--sink-overwrite", action="store_true", help="replace an existing sink file")
    r.add_argument("script")
    r.add_argument("args", nargs=argparse.REMAINDER)
    try:
        from . import sinkcli
    except ImportError:
        sinkcli = None
    if sinkcli is not None:
        sinkcli.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mpipub`` and ``python -m mpipub``."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        from .runner import run_script

        opts = {"overwrite": True} if args.sink_overwrite else {}
        return run_script(args.script, args.args, sink=args.sink, sink_options=opts)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
