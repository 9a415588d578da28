"""``python -m mpipub.bench [--quick] [--out DIR]``: run the suite, print the table, write
``latest.json`` (every repeat), ``latest.md`` (the table) and ``latest.png`` (the chart).

Each group is its own ``mpiexec`` job (in its own process group, killed on timeout); every
figure is a ratio to a baseline measured in the same run. ``--quick`` is a smoke run: tiny
sizes and one repeat; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mpipub import launcher
from mpipub.engine.contract import ZERO_COPY_MIN

KiB, MiB = 1 << 10, 1 << 20
PY = sys.executable
MPIEXEC = launcher.find_mpiexec(PY)


def _mpiexec(nranks: int, argv: list) -> list:
    """The job's command line, with what this MPI needs (mpipub.launcher)."""
    return launcher.mpiexec_command(nranks, argv, python=PY, mpiexec=MPIEXEC)

FULL = {
    "repeats": 7,
    # (bytes per array, messages per repeat over all engines)
    "stream": [[KiB, 8000], [64 * KiB, 2000], [MiB, 256], [16 * MiB, 32]],
    "stream_engines": [1, 4],
    "small": [["i", 20000], ["ai", 20000]],
    "cost": [[64 * KiB, 200], [MiB, 100], [16 * MiB, 20]],
    "fresh_n": 200, "start_n": 30, "idle_s": 10.0, "blocked_s": 3.0,
    "start_repeats": 7,
    "sink": [[KiB, 4000], [64 * KiB, 4000], [MiB, 512]], "sink_repeats": 3,
    "sink_keys": [1000, 40, 2],  # keys per step, steps per engine, engines
    "scale": [1, 2, 4, 8, 16, 32, 64], "scale_total": 4096, "scale_repeats": 3,
    "ipp": True,
    "inline": [[KiB, 8000], [4 * KiB, 8000], [8 * KiB, 8000], [16 * KiB, 4000],
               [32 * KiB, 4000], [64 * KiB, 2000], [128 * KiB, 1000]],
}
QUICK = {
    "repeats": 1,
    "stream": [[KiB, 200], [64 * KiB, 64]],
    "stream_engines": [2],
    "small": [["i", 400]],
    "cost": [[64 * KiB, 5]],
    "fresh_n": 5, "start_n": 3, "idle_s": 0.3, "blocked_s": 0.2,
    "start_repeats": 1,
    "sink": [[64 * KiB, 32]], "sink_repeats": 1,
    "sink_keys": [1000, 3, 2],  # MPIPUB_BENCH_KEYS=keys,steps,engines overrides (measuring)
    "scale": [1, 2], "scale_total": 64, "scale_repeats": 1,
    "ipp": False,
    "inline": [[4 * KiB, 64]],
}


def _log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def _compile_bytecode() -> None:
    """Compile mpipub's modules now, so that every job imports its bytecode as an installed
    package does (pip compiles at install time). A checkout run with PYTHONDONTWRITEBYTECODE
    set would otherwise compile every module in every rank of every job: here that made row 6
    1.5x instead of 1.3x, and it is not what a user's job pays. Nothing is written where the
    package is not writable (an installed copy has its bytecode already)."""
    import compileall

    import mpipub

    compileall.compile_dir(os.path.dirname(mpipub.__file__), quiet=2)


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_cmd(cmd: list, timeout: float, cwd=None, gate: Path | None = None,
            on_ready=None) -> tuple[int, float, str]:
    """Run ``cmd`` in its own process group; kill the whole group on timeout.
    Returns (returncode, seconds, output tail). With ``gate``: once the command has created
    ``gate.ready``, call ``on_ready()`` and create ``gate.go`` (see tasks.wait_at_gate)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # (a pipe could fill while we wait at the gate)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                env=_env(), cwd=cwd, start_new_session=True)
        try:
            if gate is not None:
                ready, go = gate.with_suffix(".ready"), gate.with_suffix(".go")
                while not ready.exists() and proc.poll() is None:
                    if time.perf_counter() - t0 > timeout:
                        raise subprocess.TimeoutExpired(cmd, timeout)
                    time.sleep(0.001)
                if proc.poll() is None:
                    on_ready()
                    go.touch()
            rc = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
            note = ""
        except subprocess.TimeoutExpired:
            note = f"\n[killed after {timeout} s]{_stacks(proc.pid)}"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = -9
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # no rank outlives its job
            except ProcessLookupError:
                pass
        log.seek(0)
        out = log.read() + note
    return rc, time.perf_counter() - t0, out[-6000:]


def _stacks(root: int) -> str:
    """Where the Python processes under a hung job are (py-spy, when it is installed; the
    ranks are grandchildren of mpiexec, in a session of their own)."""
    spy = shutil.which("py-spy", path=os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", ""))
    if not spy:
        return ""
    ps = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict = {}
    for line in ps.splitlines():
        pid, ppid = line.split()
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [str(root)]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        r = subprocess.run([spy, "dump", "--pid", pid], capture_output=True, text=True,
                           timeout=30)
        if r.returncode == 0:
            out.append(r.stdout)
    return "\n" + "\n".join(out)


def run_worker(nranks: int, module: str, params: dict, tmp: Path, timeout: float,
               on_ready=None) -> dict:
    """Run a worker job; with ``on_ready``, the worker stops right before its timed part
    until ``on_ready()`` has run (tasks.wait_at_gate)."""
    ns = time.monotonic_ns()
    out = tmp / f"{module}-{nranks}-{ns}.json"
    gate = None
    if on_ready is not None:
        gate = tmp / f"gate-{ns}"
        params = {**params, "gate": str(gate)}
    cmd = _mpiexec(nranks, [PY, "-m", f"mpipub.bench.{module}", json.dumps(params), str(out)])
    rc, dt, tail = run_cmd(cmd, timeout, gate=gate, on_ready=on_ready)
    if rc != 0 or not out.exists():
        raise RuntimeError(f"{module} with {nranks} ranks failed (status {rc}, {dt:.1f} s):\n"
                           f"{tail}")
    return json.loads(out.read_text())


def med(xs) -> float:
    return statistics.median(xs)


def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def _rate(x: float, unit: str) -> str:
    if unit == "B/s":
        return f"{x / 1e9:.2f} GB/s" if x >= 1e8 else f"{x / 1e6:.0f} MB/s"
    if unit == "msg/s":
        return f"{x / 1e3:.1f} k/s"
    return f"{x:.3g}"


def entry(row, what, config, bname, bunit, brep, mname, mrep, ratio, floor, met, note="",
          fmt=None) -> dict:
    fmt = fmt or (lambda x: _rate(x, bunit))
    return {"row": row, "what": what, "config": config,
            "baseline": {"name": bname, "unit": bunit, "median": med(brep), "repeats": brep,
                         "shown": fmt(med(brep))},
            "mpipub": {"name": mname, "unit": bunit, "median": med(mrep), "repeats": mrep,
                       "shown": fmt(med(mrep))},
            "ratio": ratio, "floor": floor, "met": met, "note": note}


# -- groups ---------------------------------------------------------------------------------------
#: The raw receivers of the throughput rows (tasks.RAW_RECEIVERS), as the table names them.
#: (a) is the ratio's baseline and the floors'; (b) must be matched (ratio >= 1.0); (c) is
#: information. The "raw + copy" programs make the engine's copy of each step, as
#: publish_data's copy semantics require: one message per step ("rawcopy"), or batched as the
#: engine batches ("rawbatch"), and batched into a receiver that keeps what mpipub keeps
#: ("rawbatchring": mpipub's work, done raw). They say where a floor is out of reach.
BASELINES = {"reuse": "(a) reused buffer", "ring": "(b) ring = history",
             "fresh": "(c) fresh arrays", "rawcopy": "raw + sender copy",
             "rawbatch": "raw + copy, batched", "rawbatchring": "raw + copy, batched, ring"}
STREAM_MODES = ["reuse", "ring", "fresh", "rawcopy", "rawbatch", "rawbatchring", "copy",
                "zerocopy"]


def out_of_reach(row: dict, floor: float) -> str | None:
    """For a row that misses its floors: why they are out of reach with the engine's copy
    (issue 17: "prove it with a raw program that does the same work, the same copies and the
    same memory kept, and show that mpipub matches that program"), or None.

    Out of reach when the raw programs that make the copy miss the same floor themselves: the
    faster of them (keeping only the latest) against (a), the one that also keeps mpipub's
    memory against (b); and mpipub is at least as fast as that last one, which does its work
    (where only (b) is missed, that is the whole test)."""
    b = row.get("baselines", {})
    same = [b[k] for k in ("rawcopy", "rawbatch") if k in b]
    mem, ring = b.get("rawbatchring"), b.get("ring")
    if row["met"] or not same or mem is None or ring is None or mem["ratio"] < 1.0:
        return None
    a = row["baseline"]["median"]
    best = max(x["median"] for x in same) / a
    if row["ratio"] < floor and best >= floor:
        return None  # a raw program with the copy reaches the floor: the copy is not why
    # ((b) missed: mpipub >= the program doing its work, so that program misses (b) too)
    return (f"out of reach with the engine's copy: the raw programs that make it reach "
            f"{best:.2f} of (a) at best, {mem['median'] / a:.2f} when they also keep "
            f"mpipub's memory ({mem['median'] / ring['median']:.2f} of (b)); mpipub "
            f"{row['ratio']:.2f} of (a), {mem['ratio']:.2f}x the raw program doing its work")


def add_baselines(row: dict, r: dict, mode: str, need_b: bool = True) -> dict:
    """Put every raw receiver measured in ``r`` beside ``row`` (whose baseline is (a)), and
    require >= 1.0 of (b) when ``need_b``."""
    mine = med(r[mode])
    row["baselines"] = {k: {"name": BASELINES[k], "median": med(r[k]), "repeats": r[k],
                            "ratio": mine / med(r[k])} for k in BASELINES if r.get(k)}
    b = row["baselines"].get("ring")
    if need_b and b is not None:
        row["floor"] += ", >= 1.0 of (b)"
        row["met"] = bool(row["met"]) and b["ratio"] >= 1.0
    return row


def g_stream(cfg, tmp, rows, raw):
    for n_eng in cfg["stream_engines"]:
        params = {"stream": cfg["stream"], "modes": STREAM_MODES, "repeats": cfg["repeats"]}
        if n_eng == max(cfg["stream_engines"]):
            params["small"] = cfg["small"]
        if n_eng == min(cfg["stream_engines"]):
            params["cost"] = cfg["cost"]
        res = run_worker(n_eng + 1, "w_stream", params, tmp, 600)
        raw.append({"group": "stream", "engines": n_eng, "result": res})
        for case in res["stream"]:
            r = case["repeats"]
            base = med(r["reuse"])
            for mode in ("copy", "zerocopy"):
                # against (a): 0.75 from 64 KiB (issue 17; below 4 MiB zero-copy copies too,
                # so it has the same floor), 0.5 below, where MPI's per-message cost rules
                fl = 0.75 if case["nbytes"] >= 64 * KiB else 0.5
                ratio = med(r[mode]) / base
                sp = case.get("spread", {})
                note = ""
                if n_eng > 1 and sp.get("reuse") and sp.get(mode):
                    # fairness: the slowest engine's throughput over the fastest's (medians)
                    note = (f"per-engine throughput min/max: raw (a) {med(sp['reuse']):.2f}, "
                            f"mpipub {med(sp[mode]):.2f}")
                rows.append(add_baselines(entry(
                    "1", "publish throughput", f"{_size(case['nbytes'])}, {n_eng} eng, "
                    f"{'copy' if mode == 'copy' else 'zero-copy'}",
                    "raw Isend + mprobe/Recv into one reused buffer", "B/s", r["reuse"],
                    f"publish_data({mode})", r[mode], ratio, f">= {fl}", ratio >= fl,
                    note=note), r, mode))
                if mode == "copy" or case["nbytes"] < ZERO_COPY_MIN:  # (the copy is made)
                    why = out_of_reach(rows[-1], fl)
                    if why:
                        rows[-1]["out_of_reach"] = why
                        rows[-1]["note"] = "; ".join(x for x in (note, why) if x)
                if note:
                    rows[-1]["spread"] = {"raw": sp["reuse"], "mpipub": sp[mode]}
        for case in res["small"]:
            r = case["repeats"]
            ratio = med(r["mpipub"]) / med(r["raw"])
            d = "{'i': int}" if case["kind"] == "i" else "{'a': 20 doubles, 'i': int}"
            rows.append(entry("2", "small-publication rate", f"{d}, {n_eng} eng",
                              "raw isend/recv (pickled)", "msg/s", r["raw"], "publish_data",
                              r["mpipub"], ratio, ">= 0.7", ratio >= 0.7))
        for case in res["cost"]:
            r = case["repeats"]
            ratio = med(r["publish_data"]) / med(r["copyto"])
            rows.append(entry("3", "publish_data call (copy)", f"{_size(case['nbytes'])}, "
                              f"{case['gap_s'] * 1e3:.1f} ms between steps", "numpy.copyto",
                              "s", r["copyto"], "publish_data", r["publish_data"], ratio,
                              "<= 1.5x", ratio <= 1.5, fmt=lambda x: f"{x * 1e6:.0f} us"))


def g_latency(cfg, tmp, rows, raw):
    params = {k: cfg[k] for k in ("fresh_n", "start_n", "idle_s", "blocked_s")}
    res = run_worker(5, "w_latency", params, tmp, 180)
    raw.append({"group": "latency", "result": res})
    ms = lambda x: f"{x * 1e3:.2f} ms"  # noqa: E731
    r = res["freshness"]["repeats"]
    extra = med(r["freshness"]) - med(r["raw_one_way"])
    rows.append(entry("4", "freshness (publish -> ar.data)", "{'i': int}, 1 eng, idle client",
                      "raw ping one-way", "s", r["raw_one_way"], "publish_data -> ar.data",
                      r["freshness"], extra, "<= raw + 2 ms", extra <= 2e-3, fmt=ms))
    rows[-1]["ratio_shown"] = f"+{extra * 1e3:.2f} ms"
    r = res["idle_cpu"]["repeats"]
    idle = med(r["idle"])
    pct = lambda x: f"{x * 100:.1f}% core"  # noqa: E731
    rows.append(entry("5", "idle engine CPU", f"4 eng idle {res['idle_cpu']['idle_s']:g} s",
                      "blocked in MPI_Recv", "core", r["blocked"], "idle engine", r["idle"],
                      idle, "<= 2% core", idle <= 0.02, fmt=pct))
    rows[-1]["ratio_shown"] = pct(idle)
    client = med(r["client_idle"])  # rank 0 with a client and no task outstanding
    rows.append(entry("5", "idle client CPU", f"rank 0, no task, {res['idle_cpu']['idle_s']:g} s",
                      "blocked in MPI_Recv", "core", r["blocked"], "idle client (rank 0)",
                      r["client_idle"], client, "<= 1% core", client <= 0.01, fmt=pct))
    rows[-1]["ratio_shown"] = pct(client)
    r = res["task_start"]["repeats"]
    lat = med(r["idle"])
    rows.append(entry("5", "idle engine starts a task", "1 eng, idle 50-100 ms before",
                      "blocked MPI_Recv wake-up", "s", r["blocked"], "apply_async -> task runs",
                      r["idle"], lat, "<= 5 ms", lat <= 5e-3, fmt=ms))
    rows[-1]["ratio_shown"] = ms(lat)


def g_start(cfg, tmp, rows, raw):
    script = tmp / "empty.py"
    script.write_text("")
    base_cmd = _mpiexec(5, [PY, "-c", "from mpi4py import MPI"])
    pub_cmd = _mpiexec(5, [PY, "-m", "mpipub", "run", str(script)])
    times: dict = {"raw": [], "mpipub": []}
    for i in range(cfg["start_repeats"] + 1):
        for name, cmd in ((("raw", base_cmd), ("mpipub", pub_cmd)) if i % 2 == 0
                          else (("mpipub", pub_cmd), ("raw", base_cmd))):
            rc, dt, tail = run_cmd(cmd, 60)
            if rc != 0:
                raise RuntimeError(f"{cmd} failed ({rc}):\n{tail}")
            if i:  # the first round warms the file cache
                times[name].append(dt)
    raw.append({"group": "start", "result": times})
    ratio = med(times["mpipub"]) / med(times["raw"])
    rows.append(entry("6", "job start + shut down", "5 ranks, empty script",
                      "mpiexec python -c 'from mpi4py import MPI'", "s", times["raw"],
                      "python -m mpipub run empty.py", times["mpipub"], ratio, "<= 1.5x",
                      ratio <= 1.5, fmt=lambda x: f"{x:.2f} s"))


def _ballast(nbytes: int) -> list:
    """``nbytes`` (256 MiB to 2 GiB) of memory touched now, for g_sink to free right before a
    measurement (see there): a list, emptied to free it."""
    import numpy as np

    return [np.ones(min(max(nbytes, 256 * MiB), 2048 * MiB) // 8)]


def g_sink(cfg, tmp, rows, raw):
    try:
        import mpipub.sink.writer  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        rows.append({"row": "7", "what": "sink to HDF5", "config": "-", "pending": True,
                     "note": f"pending: mpipub.sink not importable ({exc!r})"})
        return
    from mpipub.bench.w_sink import h5py_baseline, writer_alone

    for nbytes, total in cfg["sink"]:
        base, pub, alone, rawmpi, rawring = [], [], [], [], []
        steps = (total // 4) * 4
        for rep in range(cfg["sink_repeats"]):
            # Each measurement starts right after the previous one's file is deleted and its
            # dirty pages written (writeback throttling otherwise lands on whichever writes
            # second); the order alternates. And right after as much recently touched memory
            # was freed: this VM hands freed memory back to the host within ~2 s (free page
            # reporting), and touching it again is slow. Plain h5py fell from 2.3-2.7 to
            # 0.5-0.65 GB/s when it started 3 s after the delete, and the sink, which needs
            # more memory than the file it writes (rank 0's receive buffers), depended on
            # how much the previous measurement had freed. So every measurement, the MPI
            # jobs started and waiting at a gate, begins right after the driver deletes the
            # previous file and frees a ballast it had touched (_ballast).
            order = ("sink", "h5py", "alone", "raw", "ring")
            for which in (order if rep % 2 == 0 else order[::-1]):
                path = tmp / f"{which}-{rep}.h5"
                ballast = _ballast(3 * steps * nbytes)

                def delete_previous(keep=path, ballast=ballast):
                    for f in tmp.glob("*.h5"):
                        if f != keep:
                            f.unlink()
                    os.sync()
                    ballast.clear()

                if which == "h5py":
                    delete_previous()
                    base.append(h5py_baseline(str(path), nbytes, steps))
                elif which == "alone":
                    delete_previous()
                    alone.append(writer_alone(str(path), nbytes, steps))
                else:
                    res = run_worker(5, "w_sink", {"path": str(path), "raw": which != "sink",
                                                   "recv": which, "nbytes": nbytes,
                                                   "total": total}, tmp, 300,
                                     on_ready=delete_previous)
                    assert res["steps"] == steps, (res["steps"], steps)
                    {"raw": rawmpi, "ring": rawring, "sink": pub}[which].append(
                        res["bytes"] / res["seconds"])
        raw.append({"group": "sink", "nbytes": nbytes, "h5py": base, "mpipub": pub,
                    "writer_alone": alone, "raw_mpi_h5py": rawmpi, "raw_ring_h5py": rawring})
        # row 7's baseline is (a): raw MPI into one reused buffer + plain h5py on rank 0
        ratio = med(pub) / med(rawmpi)
        row = entry("7", "every step to HDF5", f"{_size(nbytes)}, 4 eng",
                    "raw MPI (a) reused buffer + h5py on rank 0", "B/s", rawmpi,
                    "Client(sink=...)", pub, ratio, ">= 0.8", ratio >= 0.8,
                    note=f"{med(pub) / med(base):.2f}x plain h5py in one process (row 7h)")
        add_baselines(row, {"copy": pub, "reuse": rawmpi, "ring": rawring}, "copy")
        rows.append(row)
        rows.append(entry("7h", "h5py alone (no MPI)", f"{_size(nbytes)}, 4 eng",
                          "h5py appends, 1 process", "B/s", base, "Client(sink=...)", pub,
                          med(pub) / med(base), "report", None))
        rows.append(entry("7w", "sink writer alone (no MPI)", f"{_size(nbytes)}, 4 eng",
                          "h5py appends, 1 process", "B/s", base, "Sink, 1 process", alone,
                          med(alone) / med(base), "report", None))


def g_sink_keys(cfg, tmp, rows, raw):
    """Row 7k: many keys per step (each key is a dataset per engine: what a publication
    with many keys costs the sink), against plain h5py writing the same datasets."""
    from mpipub.bench.w_sink import h5py_keys_baseline

    nkeys, steps, engines = cfg["sink_keys"]
    if os.environ.get("MPIPUB_BENCH_KEYS"):
        nkeys, steps, engines = map(int, os.environ["MPIPUB_BENCH_KEYS"].split(","))
    base, pub = [], []
    for rep in range(cfg["sink_repeats"]):
        for which in (("sink", "h5py") if rep % 2 == 0 else ("h5py", "sink")):
            path = tmp / f"keys-{which}-{rep}.h5"

            def delete_previous(keep=path):
                for f in tmp.glob("keys-*.h5"):
                    if f != keep:
                        f.unlink()
                os.sync()

            if which == "h5py":
                delete_previous()
                base.append(h5py_keys_baseline(str(path), nkeys, steps, engines))
            else:
                res = run_worker(engines + 1, "w_sink", {"path": str(path), "keys": nkeys,
                                                         "steps": steps}, tmp, 600,
                                 on_ready=delete_previous)
                assert res["steps"] == steps * engines, res
                pub.append(res["steps"] / res["seconds"])
    for f in tmp.glob("keys-*.h5"):
        f.unlink()
    raw.append({"group": "sink_keys", "keys": nkeys, "steps": steps, "engines": engines,
                "h5py": base, "mpipub": pub})
    rows.append(entry("7k", "many keys to HDF5", f"{nkeys} keys x {steps} steps, "
                      f"{engines} eng", "h5py, a dataset per key", "steps/s", base,
                      "Client(sink=...)", pub, med(pub) / med(base), "report", None,
                      fmt=lambda x: f"{x:.1f} steps/s"))


def g_scale(cfg, tmp, rows, raw):
    for n in cfg["scale"]:
        params = {"stream": [[64 * KiB, cfg["scale_total"]]], "modes": ["reuse", "ring", "copy"],
                  "repeats": cfg["scale_repeats"], "cpu": True}
        res = run_worker(n + 1, "w_stream", params, tmp, 600 + 10 * n)
        raw.append({"group": "scale", "engines": n, "result": res})
        case = res["stream"][0]
        r = case["repeats"]
        ratio = med(r["copy"]) / med(r["reuse"])
        cpu = case.get("rank0_cpu", {}).get("copy")
        note = (f"rank 0 CPU: {med(cpu) * 100:.0f}% of a core (mpipub), "
                f"{med(case['rank0_cpu']['reuse']) * 100:.0f}% (raw (a))") if cpu else ""
        rows.append(add_baselines(entry(
            "8", "scale (oversubscribed)", f"64 KiB, {n} eng", "raw fan-in, (a) reused buffer",
            "B/s", r["reuse"], "publish_data", r["copy"], ratio, ">= 0.8", ratio >= 0.8,
            note=note), r, "copy"))
        if cpu:
            rows[-1]["rank0_cpu"] = case["rank0_cpu"]


def g_ipp(cfg, tmp, rows, raw):
    """Row 9: ipyparallel (worker: ipp.py), compared with row 1 (copy, 4 engines) of this run."""
    import importlib.util

    row1 = [r for r in rows if r.get("row") == "1"]

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


def g_inline(cfg, tmp, rows, raw):
    """Where one message (payload copied into the header) stops beating header + raw buffer:
    the measurement behind wire.INLINE_LIMIT (1 engine, copy mode)."""
    params = {"inline": cfg["inline"], "repeats": cfg["repeats"]}
    res = run_worker(2, "w_stream", params, tmp, 600)
    raw.append({"group": "inline", "result": res})
    for case in res["inline"]:
        r = case["repeats"]
        ratio = med(r["inline"]) / med(r["split"])
        rows.append(entry("1i", "inline vs split (INLINE_LIMIT)", f"{_size(case['nbytes'])}, "
                          "1 eng", "header + raw buffer", "B/s", r["split"], "one message",
                          r["inline"], ratio, "report", None))


def g_kernel(cfg, tmp, rows, raw):
    try:
        import ipykernel  # noqa: F401
        import jupyter_client  # noqa: F401
        import psutil  # noqa: F401
    except ImportError as exc:
        rows.append({"row": "6k", "what": "Jupyter kernel", "config": "-", "pending": True,
                     "note": f"pending: install mpipub[notebook] and psutil ({exc!r})"})
        return
    from mpipub.bench.w_kernel import kernel_times

    res = kernel_times(tmp, 4, cfg["start_repeats"])
    raw.append({"group": "kernel", "result": res})
    sec = lambda x: f"{x:.2f} s"  # noqa: E731
    for what, key in (("kernel start to first cell", "start"), ("kernel shutdown", "stop")):
        plain, pub = med(res[f"plain_{key}"]), med(res[f"mpipub_{key}"])
        rows.append(entry("6k", what, "4 eng, jupyter_client", "plain ipykernel", "s",
                          res[f"plain_{key}"], "mpipub kernel", res[f"mpipub_{key}"],
                          pub / plain, "<= plain + 1 s", pub - plain <= 1.0, fmt=sec))
        rows[-1]["ratio_shown"] = f"{pub / plain:.2f}x ({pub - plain:+.2f} s)"


GROUPS = {"inline": g_inline, "stream": g_stream, "latency": g_latency, "start": g_start,
          "kernel": g_kernel, "sink": g_sink, "sink_keys": g_sink_keys, "scale": g_scale,
          "ipp": g_ipp}


# -- output ---------------------------------------------------------------------------------------
def machine() -> dict:
    import mpi4py
    import numpy

    if "mpi4py.MPI" not in sys.modules:  # the library's name needs no MPI_Init (a singleton
        mpi4py.rc.initialize = mpi4py.rc.finalize = False  # start is slow under Open MPI)
    from mpi4py import MPI

    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "os": platform.platform(), "python": platform.python_version(),
            "mpi": " ".join(MPI.Get_library_version().replace("\x00", "").splitlines()[0]
                            .split(",")[0].split()),
            "mpi4py": mpi4py.__version__, "numpy": numpy.__version__}


def table(result: dict) -> str:
    m = result["meta"]
    kind = "QUICK smoke run (numbers mean nothing)" if m["quick"] else "full run"
    lines = [
        f"Latest run: {m['date']} on {m['machine']['cpu']} ({m['machine']['cores']} cores), "
        f"{m['machine']['mpi']}, mpi4py {m['machine']['mpi4py']}, Python "
        f"{m['machine']['python']}; {kind}"
        f" in {m['elapsed_s']:.0f} s. Medians over repeats; ratio = mpipub / baseline.",
        "",
        "Throughput rows (1, 7, 8): baseline = raw receiver (a), one reused buffer (the floors'"
        " baseline); (b) = raw receiver keeping as many bytes as mpipub's default history (a"
        " ring of buffers); (c) = a fresh array per message (information); raw + copy = (a)"
        " with a sender that copies each step first, as publish_data does; batched copy = the"
        " same, the copies batched as an engine batches them; batched copy + ring = that, into"
        " (b)'s receiver: mpipub's work and memory, done raw (benchmarks/README.md). A floor"
        " is out of reach where the raw programs with the copy miss it too and mpipub matches"
        " the last one (the notes below the table).",
        "",
        "| # | what | case | baseline | mpipub | ratio | vs (b) | vs (c) | vs raw + copy "
        "| vs batched copy | vs batched copy + ring | floor | met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r.get("pending") or r.get("error"):
            lines.append(f"| {r['row']} | {r['what']} | {r.get('config', '-')} | - | - | - | "
                         f"- | - | - | - | - | - | {r['note']} |")
            continue
        ratio = r.get("ratio_shown") or f"{r['ratio']:.2f}"
        met = "yes" if r["met"] else "out of reach (note)" if r.get("out_of_reach") else "**NO**"
        if r["met"] is None:
            met = "report"
        others = []
        for k in ("ring", "fresh", "rawcopy", "rawbatch", "rawbatchring"):
            b = r.get("baselines", {}).get(k)
            unit = r["baseline"]["unit"]
            others.append(f"{b['ratio']:.2f} ({_rate(b['median'], unit)})" if b else "-")
        lines.append(f"| {r['row']} | {r['what']} | {r['config']} | {r['baseline']['shown']} | "
                     f"{r['mpipub']['shown']} | {ratio} | {' | '.join(others)} | {r['floor']} "
                     f"| {met} |")
    notes = [f"- row {r['row']} ({r['config']}): {r['note']}" for r in result["rows"]
             if r.get("note") and not r.get("pending") and not r.get("error")]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "ratio" in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    bars = [r for r in rows if r["row"] in ("1", "2", "7")]
    labels = [f"{r['row']}: {r['config']}" for r in bars]
    vals = [r["ratio"] for r in bars]
    floors = [float(r["floor"].split(",")[0].split()[-1]) for r in bars]
    y = range(len(bars))
    ax.barh(list(y), vals, color=["tab:green" if r["met"] else "tab:orange"
                                  if r.get("out_of_reach") else "tab:red" for r in bars])
    ax.scatter(floors, list(y), marker="|", s=200, color="k", label="floor", zorder=3)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("mpipub / baseline: raw mpi4py; row 7: plain h5py (higher is better)")
    ax.set_title("throughput ratios (rows 1, 2, 7); orange: out of reach with the copy")
    ax.legend(loc="lower right", fontsize=7)
    ax = axes[1]
    sc = [r for r in rows if r["row"] == "8"]
    if sc:
        n = [int(r["config"].split(",")[1].split()[0]) for r in sc]
        ax.plot(n, [r["ratio"] for r in sc], "o-", label="ratio mpipub / raw")
        ax.axhline(0.8, color="k", ls="--", lw=0.8, label="floor 0.8")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("engines (oversubscribed)")
        ax.set_ylabel("ratio")
        ax2 = ax.twinx()
        ax2.plot(n, [r["baseline"]["median"] / 1e9 for r in sc], "s:", color="grey",
                 label="raw GB/s")
        ax2.plot(n, [r["mpipub"]["median"] / 1e9 for r in sc], "^:", color="tab:blue",
                 label="mpipub GB/s")
        ax2.set_ylabel("GB/s")
        ax.legend(loc="lower left", fontsize=7)
        ax2.legend(loc="lower right", fontsize=7)
        ax.set_title("row 8: 64 KiB publications, fan-in")
    m = result["meta"]
    fig.suptitle(f"mpipub benchmarks {m['date']}, {m['machine']['cores']} cores, "
                 f"{m['machine']['mpi'][:40]}{' (QUICK)' if m['quick'] else ''}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpipub.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run (seconds; numbers meaningless)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results if "
                   "it exists here, else ./mpipub-bench)")
    p.add_argument("--only", default=None, help=f"comma-separated groups of {sorted(GROUPS)}")
    args = p.parse_args(argv)
    if not MPIEXEC:
        sys.stderr.write("mpipub.bench: mpiexec not found (pip install mpich)\n")
        return 2
    out = Path(args.out or ("benchmarks/results" if Path("benchmarks").is_dir()
                            else "mpipub-bench"))
    out.mkdir(parents=True, exist_ok=True)
    cfg = QUICK if args.quick else FULL
    groups = args.only.split(",") if args.only else list(GROUPS)
    if args.quick:
        groups = [g for g in groups if g != "ipp"]
    _compile_bytecode()
    rows: list = []
    raw: list = []
    t0 = time.time()
    failed = 0
    with tempfile.TemporaryDirectory(prefix="mpipub-bench-") as td:
        for g in groups:
            _log(f"{g} ...")
            tg = time.time()
            try:
                GROUPS[g](cfg, Path(td), rows, raw)
            except Exception as exc:  # noqa: BLE001 - one failed group does not end the suite
                failed += 1
                _log(f"{g} FAILED: {exc}")
                rows.append({"row": g, "what": g, "config": "-", "error": True,
                             "note": f"failed: {str(exc).splitlines()[0][:200]}"})
            # the next group starts with no dirty pages from this one: the kernel writing
            # back the sink group's files slowed the scale group's first job 3-4x
            for f in Path(td).glob("*.h5"):
                f.unlink()
            os.sync()
            _log(f"{g} done in {time.time() - tg:.0f} s")
    result = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "quick": args.quick, "elapsed_s": time.time() - t0, "machine": machine(),
                       "command": " ".join(["python -m mpipub.bench", *(argv or sys.argv[1:])]),
                       "config": cfg},
              "rows": rows, "raw": raw}
    (out / "latest.json").write_text(json.dumps(result, separators=(",", ":")))
    md = table(result)
    (out / "latest.md").write_text(md)
    chart(result, out / "latest.png")
    print(md)
    _log(f"wrote {out / 'latest.json'}, {out / 'latest.md'}, {out / 'latest.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
