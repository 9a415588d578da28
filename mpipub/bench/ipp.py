"""Row 9 (optional): ipyparallel's publish_data / ar.data with the same sizes and engines.

Runs in its own process (``python -m mpipub.bench.ipp PARAMS OUT``), started by the suite
(``g_ipp`` in ``__main__``; this worker imports nothing of the suite) in its own process
group with a timeout, because it starts an ipyparallel cluster (controller and 4 engines,
over ZeroMQ). The time runs from apply_async to the last step of every engine being
visible in ``ar.data`` (ipyparallel delivers data after the result, so ``get()`` is not enough).
"""

from __future__ import annotations

import json
import sys
import time


def pub(nmsg, nbytes):
    import numpy as np
    from ipyparallel.datapub import publish_data

    a = np.arange(max(1, nbytes // 8), dtype=np.float64)
    for i in range(nmsg):
        publish_data({"a": a, "i": i})


def measure(rc, nbytes: int, total: int, repeats: int, timeout: float = 120) -> list:
    view = rc[:]
    n = len(rc.ids)
    per = max(1, total // n)
    out = []
    for r in range(repeats + 1):  # the first one warms up
        t0 = time.perf_counter()
        ar = view.apply_async(pub, per, nbytes)
        ar.get(timeout=timeout)
        while True:
            data = ar.data
            if all(isinstance(d, dict) and d.get("i") == per - 1 for d in data):
                break
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError("ipyparallel's last step never arrived")
            time.sleep(0.001)
        dt = time.perf_counter() - t0
        if r:
            out.append(per * n * (max(1, nbytes // 8) * 8) / dt)
    return out


def main() -> None:
    import ipyparallel as ipp

    p = json.loads(sys.argv[1])
    cluster = ipp.Cluster(n=p["engines"], log_level=40)
    rc = cluster.start_and_connect_sync(activate=False)
    try:
        rc.wait_for_engines(p["engines"], timeout=120)
        res = {str(nb): measure(rc, nb, total, p["repeats"]) for nb, total in p["sizes"]}
    finally:
        try:
            rc.close()
        finally:
            cluster.stop_cluster_sync()
    with open(sys.argv[2], "w") as f:
        json.dump({"version": ipp.__version__, "engines": p["engines"], "B/s": res}, f)


if __name__ == "__main__":
    main()
