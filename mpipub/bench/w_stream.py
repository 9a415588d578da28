"""Worker (runs under mpiexec): rows 1, 2, 3 and 8, baseline and mpipub interleaved in one job.

    mpiexec -n N python -m mpipub.bench.w_stream PARAMS_JSON OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys
import time

from mpipub import Client
from mpipub.bench import tasks


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved(run, modes: list, repeats: int, amount: float) -> dict:
    """Time ``repeats`` rounds of every mode, rotating which goes first (so drift on a shared
    machine hits every mode alike); return amount/second per repeat. ``run(mode, timed)``.

    Each timed run follows an untimed run of the same mode, so that no mode pays for the
    caches, pools and pages the previous mode left: with a rotation alone each mode always
    followed the same other one, and mpipub's copy row, right after the raw ring receiver, ran
    0.8-0.9x its zero-copy row, which is the same code below 4 MiB (docs/benchmarks.md,
    2026-12-06)."""
    reps: dict = {m: [] for m in modes}
    for r in range(repeats):
        order = modes[r % len(modes):] + modes[:r % len(modes)]
        for m in order:
            run(m, False)
            reps[m].append(amount / _timed(lambda m=m: run(m, True)))
    return reps


def _share(c, total: int):
    """All engines, their count, messages per engine, and the total rounded to a multiple."""
    n = len(c)
    per = max(1, total // n)
    return c[:], n, per, per * n


def stream_case(c, nbytes: int, total: int, modes: list, repeats: int) -> dict:
    """Throughput (bytes/s reaching rank 0) for each mode; modes rotate between repeats."""
    view, n, per, total = _share(c, total)
    spread: dict = {m: [] for m in modes}  # per run: slowest engine's throughput / fastest's
    cpu: dict = {m: [] for m in modes}  # per run: rank 0's CPU seconds / wall seconds
    # More ranks than cores: raw senders wait by testing and sleeping, as mpipub's engines do
    # (an MPI_Wait spins a core in MPICH and starves rank 0: the faster raw program)
    polite = n + 1 > (os.cpu_count() or 1)

    def note_spread(mode, t0, last: dict) -> None:
        # every engine sends the same bytes, so the ratio of throughputs is that of the times
        # from submission to each engine's last arrival on rank 0
        took = [last[e] - t0 for e in view.targets]
        spread[mode].append(min(took) / max(took) if max(took) > 0 else 1.0)

    def run(mode, timed: bool):
        t0 = time.time()
        c0 = time.process_time()
        if mode in tasks.RAW_RECEIVERS or mode == "rawcopy":
            # (a) reuse, (b) ring, (c) fresh; rawcopy: (a)'s receiver, and a sender that
            # copies each step into a preallocated buffer first, as publish_data does
            last: dict = {}
            ar = view.apply_async(tasks.raw_stream, per, nbytes, polite, mode == "rawcopy")
            got = tasks.raw_recv(total, nbytes, "reuse" if mode == "rawcopy" else mode, last)
            ar.get()
            assert got == total * tasks.array(nbytes).nbytes
            if timed:
                note_spread(mode, t0, last)
        elif mode in ("rawbatch", "rawbatchring"):
            # the engine's copy and batching done raw; rawbatchring also keeps what mpipub
            # keeps (a ring as large as the history)
            ar = view.apply_async(tasks.raw_batch_stream, per, nbytes)
            got = tasks.raw_recv(n * tasks.batches(per, nbytes), tasks.batch_bytes(nbytes),
                                 "ring" if mode == "rawbatchring" else "reuse")
            ar.get()
            assert got == total * tasks.array(nbytes).nbytes
        elif mode in ("inline", "split"):
            ar = view.apply_async(tasks.pub_stream_limit, per, nbytes, mode == "inline")
            ar.get()
        else:
            ar = view.apply_async(tasks.pub_stream, per, nbytes, copy=mode != "zerocopy")
            ar.get()
            stats = ar.stats
            pubs = sum(s.publications for s in stats.values())
            assert pubs == total, (pubs, total)
            assert ar.data[0]["a"].nbytes == tasks.array(nbytes).nbytes
            if timed:
                note_spread(mode, t0, {e: s.last_time for e, s in stats.items()})
        # rank 0's share of a core (all its threads) while the run lasted: the fan-in's cost
        if timed:
            cpu[mode].append((time.process_time() - c0) / max(1e-9, time.time() - t0))

    nb = total * tasks.array(nbytes).nbytes
    reps = _interleaved(run, modes, repeats, nb)
    return {"nbytes": nbytes, "engines": n, "messages": total, "bytes": nb, "unit": "B/s",
            "repeats": reps, "spread": {m: v for m, v in spread.items() if v},
            "rank0_cpu": {m: v for m, v in cpu.items() if v}}


def small_case(c, kind: str, total: int, repeats: int) -> dict:
    view, n, per, total = _share(c, total)

    def run(mode, timed: bool):
        if mode == "raw":
            ar = view.apply_async(tasks.raw_small, per, kind)
            tasks.raw_recv_small(total)
            ar.get()
        else:
            ar = view.apply_async(tasks.pub_small, per, kind)
            ar.get()
            assert sum(s.publications for s in ar.stats.values()) == total

    reps = _interleaved(run, ["raw", "mpipub"], repeats, total)
    return {"kind": kind, "engines": n, "messages": total, "unit": "msg/s", "repeats": reps}


def cost_case(c, nbytes: int, nmsg: int) -> dict:
    gap = 0.001 + nbytes / 2e9  # a compute phase long enough for the send to complete
    c[1].apply_async(tasks.pub_cost, 3, nbytes, gap).get()  # warm-up
    tc, tp = c[1].apply_async(tasks.pub_cost, nmsg, nbytes, gap).get()
    return {"nbytes": nbytes, "gap_s": gap, "unit": "s",
            "repeats": {"copyto": tc, "publish_data": tp}}


def main() -> None:
    params = json.loads(sys.argv[1])
    out_path = sys.argv[2]
    c = Client()  # engines serve here and exit when the client closes
    out: dict = {"engines": len(c), "stream": [], "small": [], "cost": []}
    t0 = time.time()
    for nbytes, total in params.get("stream", []):
        out["stream"].append(stream_case(c, nbytes, total, params["modes"], params["repeats"]))
    out["inline"] = [stream_case(c, nbytes, total, ["inline", "split"], params["repeats"])
                     for nbytes, total in params.get("inline", [])]
    for kind, total in params.get("small", []):
        out["small"].append(small_case(c, kind, total, params["repeats"]))
    for nbytes, nmsg in params.get("cost", []):
        out["cost"].append(cost_case(c, nbytes, nmsg))
    out["elapsed_s"] = time.time() - t0
    with open(out_path, "w") as f:
        json.dump(out, f)
    c.close()


if __name__ == "__main__":
    main()
