"""Row 9 (optional): ipyparallel's publish_data / ar.data with the same sizes and engines.

Runs in its own process (``python -m mpipub.bench.ipp PARAMS OUT``), started by the suite in
its own process group with a timeout, because it starts an ipyparallel cluster (controller and
4 engines, over ZeroMQ). The time runs from apply_async to the last step of every engine being
visible in ``ar.data`` (ipyparallel delivers data after the result, so ``get()`` is not enough).
"""

from __future__ import annotations

import json
import statistics
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


def run(cfg, tmp, rows, raw, row1) -> None:
    """Suite entry: compare with row 1 (copy mode, 4 engines) of the same run."""
    import importlib.util

    from mpipub.bench.__main__ import PY, _rate, _size, run_cmd

    if importlib.util.find_spec("ipyparallel") is None:
        rows.append({"row": "9", "what": "peer: ipyparallel", "config": "-", "pending": True,
                     "note": "not measured: ipyparallel is not installed "
                             "(pip install ipyparallel)"})
        return
    sizes = [[1 << 10, 2000], [64 << 10, 400], [1 << 20, 64], [16 << 20, 8]]
    out = tmp / "ipp.json"
    params = {"engines": 4, "repeats": 3, "sizes": sizes}
    rc, dt, tail = run_cmd([PY, "-m", "mpipub.bench.ipp", json.dumps(params), str(out)], 600)
    if rc != 0 or not out.exists():
        raise RuntimeError(f"ipyparallel run failed ({rc}, {dt:.0f} s):\n{tail}")
    res = json.loads(out.read_text())
    raw.append({"group": "ipp", "result": res})
    for nb, _ in sizes:
        mine = [r for r in row1 if r["config"] == f"{_size(nb)}, 4 eng, copy"]
        if not mine:
            continue
        theirs = res["B/s"][str(nb)]
        m = mine[0]["mpipub"]["repeats"]
        ratio = statistics.median(m) / statistics.median(theirs)
        rows.append({"row": "9", "what": "peer: ipyparallel datapub", "config":
                     f"{_size(nb)}, 4 eng (ipyparallel {res['version']})",
                     "baseline": {"name": "ipyparallel publish_data -> ar.data", "unit": "B/s",
                                  "median": statistics.median(theirs), "repeats": theirs,
                                  "shown": _rate(statistics.median(theirs), "B/s")},
                     "mpipub": {"name": "publish_data (copy), row 1", "unit": "B/s",
                                "median": statistics.median(m), "repeats": m,
                                "shown": _rate(statistics.median(m), "B/s")},
                     "ratio": ratio, "ratio_shown": f"{ratio:.1f}x", "floor": "report (>= 10x)",
                     "met": None, "note": ""})


if __name__ == "__main__":
    main()
