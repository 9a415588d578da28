"""Sink throughput vs plain h5py, side by side (for the benchmark suite).

``benchmark()`` runs an MPI job (``mpiexec -n engines+1``) whose engines each publish ``steps``
arrays of every size into a sink file, timed on rank 0 from submit until the sink is flushed
and closed; then, in this process, plain h5py appends the same arrays (one resizable dataset per
engine, resize + write per array, flush at the end) to a file in the same directory. Returns
``{size_bytes: {"sink_MBps", "h5py_MBps", "ratio"}}`` (ratio = sink / h5py).

Command line: ``python -m mpipub.bench_sink [--engines 4] [--mib 64]``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

SIZES = (1 << 10, 64 << 10, 1 << 20)

_JOB = r"""
import json, os, sys, time
import numpy as np
from mpipub import Client, publish_data

def pub(nbytes, steps):
    a = np.random.default_rng(1).random(nbytes // 8)
    for i in range(steps):
        a[0] = i
        publish_data({"a": a})

out = {}
for nbytes, steps in json.loads(sys.argv[2]):
    path = os.path.join(sys.argv[1], f"sink_{nbytes}.h5")
    c = Client(sink=path, overwrite=True)
    sink = c._rt.sinks[-1]
    t0 = time.perf_counter()
    c[:].apply_sync(pub, nbytes, steps)
    c._rt.sinks.remove(sink)
    sink.close()
    out[nbytes] = time.perf_counter() - t0
    os.remove(path)
print("RESULT", json.dumps(out))
"""


def _steps_for(nbytes: int, mib_per_engine: float) -> int:
    return max(20, int(mib_per_engine * (1 << 20) / nbytes))


def h5py_append(path: str, nbytes: int, steps: int, engines: int) -> float:
    """Plain h5py: append ``steps`` arrays per engine, one dataset each; seconds taken."""
    a = np.random.default_rng(1).random(nbytes // 8)
    n = a.shape[0]
    t0 = time.perf_counter()
    with h5py.File(path, "w", libver="latest") as f:
        dss = [f.create_dataset(f"e{e}", shape=(0, n), maxshape=(None, n), dtype=a.dtype,
                                chunks=(max(1, (256 << 10) // nbytes), n))
               for e in range(engines)]
        for i in range(steps):
            a[0] = i
            for ds in dss:
                ds.resize(i + 1, axis=0)
                ds[i] = a
        f.flush()
    dt = time.perf_counter() - t0
    os.remove(path)
    return dt


def benchmark(sizes=SIZES, engines: int = 4, mib_per_engine: float = 32, directory=None,
              mpiexec: str | None = None, timeout: float = 600) -> dict:
    """Measure sink throughput vs plain h5py per array size (see module docs)."""
    work = tempfile.mkdtemp(prefix="mpipub-bench-", dir=directory)
    try:
        plan = [(int(s), _steps_for(s, mib_per_engine)) for s in sizes]
        script = os.path.join(work, "job.py")
        with open(script, "w") as fh:
            fh.write(_JOB)
        mpiexec = mpiexec or shutil.which(
            "mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
        r = subprocess.run([mpiexec, "-n", str(engines + 1), sys.executable, script, work,
                            json.dumps(plan)], capture_output=True, text=True, timeout=timeout)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode or not line:
            raise RuntimeError(f"benchmark job failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        sink_s = {int(k): v for k, v in json.loads(line[0][7:]).items()}
        out = {}
        for nbytes, steps in plan:
            total_mb = nbytes * steps * engines / 1e6
            base = h5py_append(os.path.join(work, "plain.h5"), nbytes, steps, engines)
            s = total_mb / sink_s[nbytes]
            b = total_mb / base
            out[nbytes] = {"sink_MBps": round(s, 1), "h5py_MBps": round(b, 1),
                           "ratio": round(s / b, 3), "steps": steps, "engines": engines}
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--engines", type=int, default=4)
    p.add_argument("--mib", type=float, default=32, help="MiB published per engine per size")
    a = p.parse_args()
    print(json.dumps(benchmark(engines=a.engines, mib_per_engine=a.mib), indent=1))
