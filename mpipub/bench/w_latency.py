"""Worker (runs under mpiexec): rows 4 (freshness) and 5 (idle engines), raw baselines in the
same job.

    mpiexec -n N python -m mpipub.bench.w_latency PARAMS_JSON OUT_JSON
"""

from __future__ import annotations

import json
import random
import sys
import time

import numpy as np
from mpi4py import MPI

from mpipub import Client
from mpipub.bench import tasks


def freshness(c, n: int) -> dict:
    e = c.ids[0]
    c[e].apply_async(tasks.fresh_pub, 3, 0).get()  # warm-up
    ar = c[e].apply_async(tasks.fresh_pub, n, 1)
    pubs = list(ar.stream(timeout=60))
    ar.get()
    # received: when the client's I/O thread stored it in ar.data; time: publish_data's call
    fresh = [p.received - p.time for p in pubs]
    ar = c[e].apply_async(tasks.raw_ping, 10)  # warm-up
    tasks.raw_pong(10, e)
    ar.get()
    ar = c[e].apply_async(tasks.raw_ping, n)
    tasks.raw_pong(n, e)
    one_way = [t / 2 for t in ar.get()]
    return {"unit": "s", "repeats": {"raw_one_way": one_way, "freshness": fresh}}


def idle_cpu(c, idle_s: float, blocked_s: float) -> dict:
    view = c[:]
    c0 = view.apply_async(tasks.cpu_now).get()
    rc0, rw0 = time.process_time(), time.time()
    time.sleep(idle_s)
    c1 = view.apply_async(tasks.cpu_now).get()
    rc1, rw1 = time.process_time(), time.time()
    idle = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(c0, c1)]
    client = (rc1 - rc0) / (rw1 - rw0)
    # baseline: the same engines blocked in a raw MPI receive for blocked_s
    ar = view.apply_async(tasks.blocked_cpu)
    time.sleep(blocked_s)
    b = np.zeros(1)
    for e in c.ids:
        MPI.COMM_WORLD.Send([b, MPI.DOUBLE], e, tasks.TAG)
    blocked = [cpu / wall for cpu, wall in ar.get()]
    return {"unit": "core fraction", "idle_s": idle_s, "blocked_s": blocked_s,
            "repeats": {"blocked": blocked, "idle": idle, "client_idle": [client]}}


def task_start(c, n: int) -> dict:
    e = c.ids[0]
    rng = random.Random(2)
    c[e].apply_async(tasks.now).get()
    lat = []
    for _ in range(n):
        time.sleep(rng.uniform(0.05, 0.1))  # the engine reaches its longest idle sleep
        t = time.time()
        lat.append(c[e].apply_async(tasks.now).get() - t)
    ar = c[e].apply_async(tasks.blocked_start, n)
    time.sleep(0.1)
    b = np.zeros(1)
    sent = []
    for _ in range(n):
        time.sleep(rng.uniform(0.02, 0.05))
        sent.append(time.time())
        MPI.COMM_WORLD.Send([b, MPI.DOUBLE], e, tasks.TAG)
    raw = [r - s for r, s in zip(ar.get(), sent)]
    return {"unit": "s", "repeats": {"blocked": raw, "idle": lat}}


def main() -> None:
    params = json.loads(sys.argv[1])
    c = Client()
    out = {"engines": len(c)}
    out["freshness"] = freshness(c, params["fresh_n"])
    out["task_start"] = task_start(c, params["start_n"])
    out["idle_cpu"] = idle_cpu(c, params["idle_s"], params["blocked_s"])
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)
    c.close()


if __name__ == "__main__":
    main()
