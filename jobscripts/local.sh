#!/bin/bash
# Run a script under mpipub on this machine: ./jobscripts/local.sh N script.py [args]
# N ranks in all: rank 0 runs the script, ranks 1..N-1 are engines.
set -euo pipefail
N=${1:?usage: local.sh NRANKS SCRIPT [ARGS]}; shift
VENV=${VENV:-.venv}
# mpipub.launcher runs the venv's mpiexec with what its MPI needs (Open MPI: --oversubscribe
# past the cores, --allow-run-as-root as root, no libfabric on one node; MPICH: nothing)
exec "$VENV/bin/python" -m mpipub.launcher -n "$N" "$VENV/bin/python" -m mpipub run "$@"
