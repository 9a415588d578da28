"""Worker (runs under mpiexec): row 7, every publication to HDF5 through ``Client(sink=...)``;
row 7k, 1,000 keys per step.

    mpiexec -n 5 python -m mpipub.bench.w_sink PARAMS_JSON OUT_JSON

One job per measurement (a job has one client and one sink): the time runs from submitting
the task until the sink is flushed and closed, i.e. every step is in the closed file. Stopping
the engines (``Client.close()``) is not timed: it is no work of the sink, and the h5py baseline
has nothing like it.
"""

from __future__ import annotations

import json
import sys
import time

from mpipub import Client
from mpipub.bench import tasks

#: published (into the sink, as a task of its own) before the timed task: see main()
WARM_BYTES = 128 << 20


def main() -> None:
    p = json.loads(sys.argv[1])
    if p.get("raw"):
        return raw_fan_in_h5py(p)
    if p.get("keys"):
        return many_keys(p)
    c = Client(sink=p["path"], overwrite=True)
    sink = c._rt.sinks[-1]
    per = max(1, p["total"] // len(c))
    # warm up, as the baseline is warm (its array, h5py): the first WARM_BYTES of a run fill
    # the engines' and rank 0's buffer pools (fresh pages; on this VM ~1 GB/s to touch)
    warm = max(1, min(per, WARM_BYTES // len(c) // p["nbytes"]))
    c[:].apply_async(tasks.pub_stream, warm, p["nbytes"], copy=True).get()
    tasks.wait_at_gate(p)
    t0 = time.perf_counter()
    c[:].apply_async(tasks.pub_stream, per, p["nbytes"], copy=True).get()
    c._rt.sinks.remove(sink)  # close the sink alone: every step is in the closed file
    sink.close()
    dt = time.perf_counter() - t0
    c.close()
    with open(sys.argv[2], "w") as f:
        json.dump({"seconds": dt, "bytes": per * len(c) * tasks.array(p["nbytes"]).nbytes,
                   "steps": per * len(c), "warm_steps": warm * len(c)}, f)


def many_keys(p: dict) -> None:
    """Row 7k: each engine publishes ``steps`` dicts of ``keys`` floats into the sink; timed
    from submit until the sink file is closed (its datasets created in the timed task, as in
    a run whose first step has them all)."""
    c = Client(sink=p["path"], overwrite=True)
    sink = c._rt.sinks[-1]
    c[:].apply_async(tasks.pub_keys, 2, 10).get()  # warm: a task's groups, a few keys
    tasks.wait_at_gate(p)
    t0 = time.perf_counter()
    c[:].apply_async(tasks.pub_keys, p["steps"], p["keys"]).get()
    c._rt.sinks.remove(sink)
    sink.close()
    dt = time.perf_counter() - t0
    n = len(c)
    c.close()
    with open(sys.argv[2], "w") as f:
        json.dump({"seconds": dt, "steps": p["steps"] * n, "engines": n}, f)


def h5py_keys_baseline(path: str, nkeys: int, steps: int, engines: int) -> float:
    """Row 7k's baseline: plain h5py in one process writes the same keys, one resizable
    dataset per key and engine, appended step by step; returns steps/s (all engines)
    including closing the file."""
    import h5py

    names = [f"k{i}" for i in range(nkeys)]
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        groups = [f.create_group(f"engine_{e}") for e in range(1, engines + 1)]
        dss = [[g.create_dataset(k, shape=(0,), maxshape=(None,), dtype="f8", chunks=(512,))
                for k in names] for g in groups]
        for step in range(steps):
            for e in range(engines):
                for i, ds in enumerate(dss[e]):
                    ds.resize(step + 1, axis=0)
                    ds[step] = float(step + i)
    return steps * engines / (time.perf_counter() - t0)


def h5py_baseline(path: str, nbytes: int, total: int) -> float:
    """Plain h5py in one process appending the same arrays (one resizable dataset);
    returns bytes/s including closing the file."""
    import h5py

    a = tasks.array(nbytes)
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("a", shape=(0, a.size), maxshape=(None, a.size), dtype=a.dtype,
                              chunks=(max(1, min(total, (1 << 20) // a.nbytes)), a.size))
        for i in range(total):
            ds.resize(i + 1, axis=0)
            ds[i] = a
    return total * a.nbytes / (time.perf_counter() - t0)


def raw_fan_in_h5py(p: dict) -> None:
    """Row 7's baseline (all ranks, no mpipub): the engines ``Isend`` the same arrays as row
    1's raw baseline (no copy, the same bound on sends in flight, waiting like mpipub's
    engines); rank 0 receives each (matched probe + ``Recv`` into one reused buffer, (a), or
    into a ring as large as mpipub's history, (b), ``p["recv"] == "ring"``) and appends it with
    plain h5py, one dataset per engine, like ``h5py_baseline``: the fastest simple program
    that moves the data with MPI and writes every step on rank 0."""
    import h5py
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    engines = comm.size - 1
    per = max(1, p["total"] // engines)
    a = tasks.array(p["nbytes"])
    if comm.rank == 0:
        tasks.wait_at_gate(p)
    comm.Barrier()
    t0 = time.perf_counter()
    if comm.rank:  # waiting politely: a spinning MPI_Wait on 4 engines starves rank 0 on
        tasks.raw_stream(per, p["nbytes"], polite=True)  # 2 cores (0.26 GB/s at 1 MiB)
        comm.Barrier()
        return
    rows = max(1, min(per, (1 << 20) // a.nbytes))
    st = MPI.Status()
    # (a): one reused receive buffer (h5py has copied a step into its chunk cache when the
    # write returns); (b) "ring": a ring of buffers as large as mpipub's default history
    ring = tasks._ring_of(a.nbytes) if p.get("recv") == "ring" else None
    buf, slot = np.ones(a.size, a.dtype), 0
    with h5py.File(p["path"], "w") as f:
        dss = [f.create_dataset(f"e{e}", shape=(0, a.size), maxshape=(None, a.size),
                                dtype=a.dtype, chunks=(rows, a.size))
               for e in range(1, engines + 1)]
        for _ in range(per * engines):
            msg = comm.mprobe(MPI.ANY_SOURCE, tasks.TAG, st)
            if ring is not None:
                buf = ring[slot]
                slot = slot + 1 if slot + 1 < len(ring) else 0
            msg.Recv([buf, MPI.BYTE])
            ds = dss[st.Get_source() - 1]
            k = ds.shape[0]
            ds.resize(k + 1, axis=0)
            ds[k] = buf
    dt = time.perf_counter() - t0
    with open(sys.argv[2], "w") as fh:
        json.dump({"seconds": dt, "bytes": per * engines * a.nbytes, "steps": per * engines}, fh)
    # Leaving MPI while an engine has yet to see its last send complete left that engine
    # testing it forever now and then (1 job in ~75 with 64 KiB messages): stay until all
    # the engines are done.
    comm.Barrier()


def writer_alone(path: str, nbytes: int, total: int, engines: int = 4) -> float:
    """The sink's writer without MPI: this process hands it the same publications, as 4
    engines' batches would arrive (no transport, no engines); returns bytes/s including
    closing the file. Tells the sink's own cost from what sharing the cores costs."""
    import types

    from mpipub.sink.writer import Sink

    a = tasks.array(nbytes)
    rec = types.SimpleNamespace(task_id=1, label="bench", submitted=time.time(),
                                engines=list(range(1, engines + 1)),
                                hosts=["-"] * (engines + 1), finished=None)
    t0 = time.perf_counter()
    sink = Sink(path, overwrite=True)
    sink.on_task_start(rec, (writer_alone, (), {}))
    for i in range(total // engines):
        for e in rec.engines:
            sink.on_publications(rec, e, [(i, time.time(), {"a": a}, a.nbytes)])
    rec.finished = time.time()
    sink.on_task_end(rec)
    sink.close()
    return (total // engines) * engines * a.nbytes / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
