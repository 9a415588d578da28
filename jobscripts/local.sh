#!/bin/bash
# Run a script under mpipub on this machine: ./jobscripts/local.sh N script.py [args]
# N ranks in all: rank 0 runs the script, ranks 1..N-1 are engines.
set -euo pipefail
N=${1:?usage: local.sh NRANKS SCRIPT [ARGS]}; shift
VENV=${VENV:-.venv}
exec "$VENV/bin/mpiexec" -n "$N" "$VENV/bin/python" -m mpipub run "$@"
