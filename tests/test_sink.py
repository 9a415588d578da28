"""The HDF5 sink: real files, real mpiexec jobs (see docs/sink.md)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from conftest import (
    PYTHON,
    finish,
    kill_group,
    mpi_env,
    run_mpi,
    start_mpi,
    wait_for_file,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

SIM = """
import sys, time, json
import numpy as np
import mpipub
from mpipub import Client, publish_data, PublishError

def sim(n, delay=0.0):
    a = np.zeros((4, 3))
    for i in range(n):
        a[...] = i            # the same array, changed in place between publishes
        d = {"a": a, "i": i, "x": float(i) / 3, "s": f"s{i}", "b": bytes([i % 256, 0, 7]),
             "cfg": {"k": np.int16(i), "deep": {"flag": i % 2 == 0}},
             "fs": np.array([b"ab", b"c"]), "z": np.arange(3) + 1j}
        if i >= 5:
            d["late"] = np.full(i % 4 + 1, i, dtype=np.float32)   # late, shape changes
        if i == 7:
            d["late"] = "text"                                    # and kind changes
        publish_data(d)
        if delay:
            time.sleep(delay)
    return n
"""


def _script(tmp_path, name, body):
    p = tmp_path / name
    p.write_text(textwrap.dedent(SIM) + textwrap.dedent(body))
    return p


def _check_sim_engine(g, n):
    """Exact check of one engine group written by ``sim`` with plain h5py."""
    assert g["step"][:].tolist() == list(range(n))
    assert np.all(np.diff(g["time"][:]) >= 0) and np.all(g["received"][:] >= g["time"][:] - 1)
    a = g["data/a"][:]
    assert a.shape == (n, 4, 3) and a.dtype == np.float64
    assert np.array_equal(a, np.broadcast_to(np.arange(n)[:, None, None], (n, 4, 3)))
    index = {r["name"].decode(): r for r in g["index"][:]}   # format 2: "a" is dense
    assert index["a"]["first"] == 0 and index["a"]["kind"] == b"array" and "a" not in g["steps"]
    assert g["data/i"][:].tolist() == list(range(n))
    assert np.array_equal(g["data/x"][:], np.arange(n) / 3)
    assert [v.decode() for v in g["data/s"][:]] == [f"s{i}" for i in range(n)]
    assert [bytes(v) for v in g["data/b"][:]] == [bytes([i % 256, 0, 7]) for i in range(n)]
    assert g["data/cfg/k"].dtype == np.int16 and g["data/cfg/k"][:].tolist() == list(range(n))
    assert g["data/cfg/deep/flag"][:].tolist() == [i % 2 == 0 for i in range(n)]
    assert g["data/fs"][0].tolist() == [b"ab", b"c"]
    assert np.array_equal(g["data/z"][n - 1], np.arange(3) + 1j)


def test_every_step_exact_late_keys_and_refused_values(mpi_script, tmp_path):
    sink = tmp_path / "run.h5"
    job = mpi_script(SIM + f"""
def bad():
    publish_data({{"ok": 1}})
    try:
        publish_data({{"obj": object()}})
    except PublishError as e:
        return str(e)
    return "not refused"

c = Client(sink={str(sink)!r}, flush_interval=0.2)
ar = c[:].apply_async(sim, 60)
ar.get(timeout=60)
print("DATA", repr(ar.data[0]["i"]), repr(ar.data[0]["late"]))
print("BAD", c[1].apply_sync(bad))
c.close()
""", nranks=3, timeout=90)
    assert job.returncode == 0, job.output
    assert "DATA 59 array([59., 59., 59., 59.], dtype=float32)" in job.stdout
    assert "cannot store key 'obj'" in job.stdout and "object" in job.stdout
    with h5py.File(sink, "r") as f:
        assert f.attrs["mpipub_format"] == 2 and "closed" in f.attrs
        t = f["task_0001"]
        assert t.attrs["function"] == "sim" and t.attrs["args"] == "(60,)"
        assert t.attrs["end"] >= t.attrs["start"]
        for e in (1, 2):
            g = t[f"engine_{e}"]
            assert g.attrs["rank"] == e
            _check_sim_engine(g, 60)
            # late key with changing shapes/kinds: one dataset per signature, steps tell which
            got = {}
            for r in g["index"][:]:
                name = r["name"].decode()
                if name.split("@")[0] == "late":
                    rows = g[f"data/{name}"][:]
                    if r["first"] >= 0:  # dense: the engine's publications first, first+1..
                        steps = g["step"][r["first"]:r["first"] + len(rows)]
                    else:
                        steps = g[f"steps/{name}"][:]
                    for st, v in zip(steps, rows):
                        assert int(st) not in got
                        got[int(st)] = v
            assert sorted(got) == list(range(5, 60))
            assert got[7] == b"text"
            assert np.array_equal(got[9], np.full(2, 9, np.float32))
        assert f["task_0002/engine_1/data/ok"][:].tolist() == [1]
        assert "obj" not in f["task_0002/engine_1/data"]

    import mpipub

    with mpipub.open(sink) as run:
        assert run.tasks == [1, 2]
        t = run.task(1)
        assert t.engines == [1, 2]
        assert {"a", "i", "x", "s", "b", "cfg", "late", "fs", "z"} <= set(t.keys)
        d = t.data[1]
        assert d["i"] == 59 and type(d["i"]) is int and d["s"] == "s59"
        assert d["cfg"] == {"k": np.int16(59), "deep": {"flag": False}}
        assert type(d["cfg"]["k"]) is np.int16 and d["b"] == bytes([59, 0, 7])
        at7 = t.data_at(7)[0]
        assert at7["late"] == "text" and at7["x"] == 7 / 3
        assert "late" not in t.data_at(3)[0]
        assert t.data_at(1000) == [None, None]
        a = t["a"][0]
        assert a.shape == (60, 4, 3) and a[17, 2, 1] == 17
        late = t["late"][1]
        assert isinstance(late, list) and len(late) == 55 and late[2] == "text"
        assert t.steps("late")[0].tolist() == list(range(5, 60))


@pytest.fixture(scope="module")
def sim_file(tmp_path_factory):
    """One file written by ``sim`` (12 steps, 2 engines), for the readers that are not mpipub."""
    d = tmp_path_factory.mktemp("readers")
    sink = d / "run.h5"
    script = _script(d, "job.py", f"""
c = Client(sink={str(sink)!r})
c[:].apply_async(sim, 12).get(timeout=60)
c.close()
""")
    job = run_mpi(3, [str(script)], timeout=90, cwd=d)
    assert job.returncode == 0, job.output
    return sink


def test_h5dump_reads_the_file(sim_file):
    """docs/sink.md promises a layout that HDF5's own tools read, without mpipub."""
    h5dump = shutil.which("h5dump")
    if h5dump is None:
        pytest.skip("h5dump not installed (Debian: apt-get install hdf5-tools; .ci/run does)")

    def dump(*args):
        p = subprocess.run([h5dump, *args, str(sim_file)], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    names = dump("-n")
    for path in ("/task_0001/engine_2/data/a", "/task_0001/engine_2/data/cfg/deep/flag",
                 "/task_0001/engine_2/index", "/task_0001/engine_2/data/late@1"):
        assert f"dataset    {path}\n" in names, names
    i = dump("-d", "/task_0001/engine_2/data/i")
    assert "(0): 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11" in i, i
    s = dump("-d", "/task_0001/engine_1/data/s")
    assert '(0): "s0", "s1", "s2"' in s, s
    a = dump("-d", "/task_0001/engine_1/data/a", "-s", "11,0,0", "-c", "1,1,3")
    assert "(11,0,0): 11, 11, 11" in a, a


def test_xarray_reads_the_file(sim_file):
    """xarray (h5netcdf engine) opens every engine's data as a Dataset, step as first axis."""
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    n = 12
    for e in (1, 2):
        grp = f"task_0001/engine_{e}/data"
        with xr.open_dataset(sim_file, engine="h5netcdf", group=grp, phony_dims="sort") as ds:
            a = ds["a"].values
            assert a.shape == (n, 4, 3)
            assert np.array_equal(a, np.broadcast_to(np.arange(n)[:, None, None], (n, 4, 3)))
            assert ds["i"].values.tolist() == list(range(n))
            assert np.array_equal(ds["x"].values, np.arange(n) / 3)
            assert [str(v) for v in ds["s"].values] == [f"s{i}" for i in range(n)]
            assert np.array_equal(ds["z"].values[n - 1], np.arange(3) + 1j)
        with xr.open_dataset(sim_file, engine="h5netcdf", group=grp + "/cfg",
                             phony_dims="sort") as ds:
            assert ds["k"].dtype == np.int16 and ds["k"].values.tolist() == list(range(n))
        with xr.open_dataset(sim_file, engine="h5netcdf", group=f"task_0001/engine_{e}",
                             phony_dims="sort") as ds:
            assert ds["step"].values.tolist() == list(range(n))
            assert ds.attrs["rank"] == e


def _steps_in(path):
    try:
        with h5py.File(path, "r", swmr=True, locking=False) as f:
            return f["task_0001/engine_1/step"].shape[0]
    except Exception:  # noqa: BLE001 - not there yet
        return 0


READER = """
import sys, time, h5py
for _ in range(50):  # the writer may be creating objects (outside SWMR mode): retry
    try:
        f = h5py.File(sys.argv[1], "r", swmr=True, locking=False)
        break
    except OSError:
        time.sleep(0.1)
d = f["task_0001/engine_1/data/a"]
seen = []
for _ in range(8):
    d.refresh()
    seen.append(d.shape[0])
    time.sleep(0.25)
n = seen[-1]
ok = all(float(d[i, 0, 0]) == i for i in range(n))
print(seen, ok)
"""


def test_swmr_live_reading_then_sigkill(tmp_path):
    sink = tmp_path / "live.h5"
    script = _script(tmp_path, "live.py", f"""
c = Client(sink={str(sink)!r}, flush_interval=0.2)
c[:].apply_async(sim, 100000, 0.005).get()
""")
    proc = start_mpi(3, [str(script)], cwd=tmp_path)
    try:
        wait_until(lambda: _steps_in(sink) > 20, 40, "first flushed steps")
        # a plain h5py reader in another process sees the dataset grow, values exact
        r = subprocess.run([PYTHON, "-c", READER, str(sink)], capture_output=True, text=True,
                           timeout=30, env=mpi_env())
        assert r.returncode == 0, r.stderr
        seen, ok = r.stdout.rsplit("]", 1)
        seen = json.loads(seen + "]")
        assert ok.strip() == "True", r.stdout + r.stderr
        assert seen[-1] > seen[0], seen
        # mpipub.open in this process: refresh() picks up new steps
        import mpipub

        run = mpipub.open(sink)
        n0 = len(run.steps()[0])
        assert n0 > 0
        n1 = wait_until(lambda: len(run.refresh().steps()[0]) > n0 and len(run.steps()[0]),
                        30, "refresh() to show new steps")
        run.close()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        kill_group(proc)
        proc.communicate()
    # the file opens with plain h5py (in SWMR-read mode: the killed writer left its SWMR
    # flags set; `h5clear -s` clears them for other tools); every flushed step is there
    with h5py.File(sink, "r", swmr=True) as f:
        assert "closed" not in f.attrs
        for e in (1, 2):
            g = f[f"task_0001/engine_{e}"]
            n = min(g["step"].shape[0], g["data/a"].shape[0])  # "a": dense from step 0
            if e == 1:  # every step a reader saw before the kill is still there
                assert n >= n1, (n, n1)
            assert n > 0
            assert g["step"][:n].tolist() == list(range(n))
            a = g["data/a"][:n]
            assert np.array_equal(a[:, 0, 0], np.arange(n))
    run = __import__("mpipub").open(sink)
    assert len(run.steps()[0]) > 0 and run.data[0]["i"] == len(run.steps()[0]) - 1
    run.close()
    # what docs/sink.md tells users of tools that do not use SWMR: h5clear -s, then h5dump
    if shutil.which("h5clear") and shutil.which("h5dump"):
        copy = tmp_path / "cleared.h5"
        shutil.copy(sink, copy)
        r = subprocess.run(["h5clear", "-s", str(copy)], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run(["h5dump", "-d", "/task_0001/engine_1/step", str(copy)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "(0): 0, 1, 2, 3," in r.stdout, r.stdout + r.stderr


def test_sigterm_flushes_and_closes(tmp_path):
    sink = tmp_path / "term.h5"
    script = _script(tmp_path, "term.py", """
from pathlib import Path
c = Client()
ar = c[:].apply_async(sim, 100000, 0.005)
while min(d.get("i", -1) for d in ar.data) < 20:   # 20 steps of each engine reached rank 0
    time.sleep(0.01)
Path("ready").touch()
ar.get()
""")
    proc = start_mpi(3, ["-m", "mpipub", "run", "--sink", str(sink), "--sink-flush", "5",
                         str(script)], cwd=tmp_path)
    try:
        wait_for_file(tmp_path / "ready", proc)
        os.kill(proc.pid, signal.SIGTERM)  # what scancel sends (mpiexec forwards it)
        job = finish(proc, 30)
    finally:
        kill_group(proc)
    with h5py.File(sink, "r") as f:
        assert "closed" in f.attrs, job.output
        for e in (1, 2):
            g = f[f"task_0001/engine_{e}"]
            n = g["step"].shape[0]
            assert n > 20, job.output  # flush interval 5 s: these came from the clean close
            assert g["step"][:].tolist() == list(range(n))
            assert np.array_equal(g["data/a"][:, 3, 2], np.arange(n))
        assert f["task_0001"].attrs["end"] > 0


def test_backpressure_slow_writer(mpi_script, tmp_path):
    sink = tmp_path / "slow.h5"
    job = mpi_script(f"""
import time, numpy as np
from mpipub import Client, publish_data
from mpipub.sink.writer import Sink

def fast(n):
    a = np.zeros(2048)          # 16 KiB per step
    t0 = time.perf_counter()
    for i in range(n):
        a[0] = i
        publish_data({{"a": a}})
    return time.perf_counter() - t0

c = Client(sink={str(sink)!r}, _delay_s=0.001, max_queue_items=50, max_queue_bytes=1 << 20)
snk = c._rt.sinks[0]  # (the queue's peaks and count: no public API, and they are the point)
t0 = time.perf_counter()
took = c[:].apply_sync(fast, 3000)
print("ENGINE_S", min(took), "PEAK", snk.peak_queue_items, snk.peak_queue_bytes)
c.close()
print("TOTAL_S", time.perf_counter() - t0, "WRITTEN", snk.written)
""", nranks=3, timeout=100, env={"MPIPUB_MAX_OUTSTANDING_COUNT": "256"})
    assert job.returncode == 0, job.output
    out = job.stdout.split()
    engine_s = float(out[out.index("ENGINE_S") + 1])
    peak_items = int(out[out.index("PEAK") + 1])
    peak_bytes = int(out[out.index("PEAK") + 2])
    # The writer sleeps 1 ms per row, 6000 rows. An engine can be ahead of it by its open batch
    # (4 MiB: 256 steps), its sends in flight (256 steps, or two messages: 512), the message
    # rank 0's I/O thread holds while it waits for room in the sink's queue (256) and that
    # queue (50): ~1,100 steps. So the faster engine's 3,000 calls cannot end before ~1,900
    # rows are written (>= 1.9 s of the writer's sleeps alone), while a producer that never
    # waits makes them in ~0.1 s. 1 s between the two: only a producer that never waited (or
    # one that runs ~900 steps further ahead than the bounds allow) fails it.
    assert engine_s > 1.0, job.stdout
    assert peak_items <= 50 and peak_bytes <= (1 << 20) + 20000, job.stdout
    assert "WRITTEN 6000" in job.stdout
    with h5py.File(sink, "r") as f:
        for e in (1, 2):
            g = f[f"task_0001/engine_{e}"]
            assert g["step"][:].tolist() == list(range(3000))
            assert np.array_equal(g["data/a"][:, 0], np.arange(3000))


def _cli(*args, timeout=60):
    return subprocess.run([PYTHON, "-m", "mpipub", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=mpi_env())


def test_cli_run_info_plot_watch_and_errors(tmp_path):
    sink = tmp_path / "cli.h5"
    script = _script(tmp_path, "cli.py", """
c = Client()
c[:].apply_sync(sim, 30)
def img():
    for i in range(3):
        publish_data({"field": np.outer(np.arange(16), np.arange(12)) * (i + 1),
                      "skipme": 1})
c[:].apply_sync(img)
""")
    job = run_mpi(4, ["-m", "mpipub", "run", "--sink", sink, "--sink-compression", "gzip",
                      "--sink-exclude", "skip*", script], timeout=90, cwd=tmp_path)
    assert job.returncode == 0, job.output
    with h5py.File(sink, "r") as f:
        assert f["task_0002/engine_3/data/field"].compression == "gzip"
        assert "skipme" not in f["task_0002/engine_3/data"]
        _check_sim_engine(f["task_0001/engine_3"], 30)

    # an existing file is refused, one line, no traceback, and left intact
    before = sink.stat().st_size, sink.stat().st_mtime
    job = run_mpi(2, ["-m", "mpipub", "run", "--sink", sink, script], timeout=60, cwd=tmp_path)
    assert job.returncode != 0 and "already exists" in job.stderr
    assert "Traceback" not in job.output
    assert (sink.stat().st_size, sink.stat().st_mtime) == before
    job = run_mpi(2, ["-m", "mpipub", "run", "--sink", tmp_path / "no" / "x.h5", script],
                  timeout=60, cwd=tmp_path)
    assert job.returncode != 0 and "does not exist" in job.stderr
    assert "Traceback" not in job.output

    r = _cli("info", sink)
    assert r.returncode == 0, r.stderr
    assert "task 1: sim() function=sim args=(30,)" in r.stdout
    assert "engine 2" in r.stdout and "30 publications, steps 0..29" in r.stdout
    assert "a: float64(4, 3) array x30" in r.stdout and "cfg/k: int16() npscalar x30" in r.stdout

    import matplotlib.image as mpimg

    png = tmp_path / "f.png"
    r = _cli("plot", sink, "--key", "field", "--step", 1, "-o", png)
    assert r.returncode == 0, r.stderr
    img = mpimg.imread(png)
    assert img.shape[1] > 3 * img.shape[0] // 2  # three panels side by side
    assert img[..., :3].std() > 0.05 and len(np.unique(img.reshape(-1, img.shape[-1]),
                                                       axis=0)) > 50
    png2 = tmp_path / "x.png"
    r = _cli("plot", sink, "--key", "x", "--task", 1, "-o", png2)
    assert r.returncode == 0 and mpimg.imread(png2)[..., :3].std() > 0.05

    r = _cli("watch", sink, "--interval", 0.1, timeout=30)
    assert r.returncode == 0 and "run ended" in r.stdout and "30 steps" in r.stdout

    noth5 = tmp_path / "not.h5"
    noth5.write_text("hello")
    for args, msg in [(("info", noth5), "not an HDF5 file"),
                      (("info", tmp_path / "missing.h5"), "no such file"),
                      (("plot", noth5, "--key", "a"), "not an HDF5 file"),
                      (("plot", sink, "--key", "nokey"), "no key 'nokey'"),
                      (("plot", sink, "--key", "a", "--task", 9), "no task 9"),
                      (("watch", noth5), "not an HDF5 file")]:
        r = _cli(*args)
        assert r.returncode != 0 and msg in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_dense_and_sparse_datasets_read_back_exactly(tmp_path):
    """Format 2 in one process (the sink's writer fed as the client feeds it): keys at every
    step (dense, no steps dataset), every third step, first seen late, changing dtype and
    back, nested, str and bytes; mpipub.open gives every step of every key, exactly."""
    import types

    import mpipub
    from mpipub.sink.writer import Sink

    path = tmp_path / "dense.h5"
    rec = types.SimpleNamespace(task_id=1, label="t", submitted=time.time(), engines=[1, 2],
                                hosts=["-"] * 3, finished=None)
    sink = Sink(path)
    sink.on_task_start(rec, (print, (), {}))
    expect: dict = {1: {}, 2: {}}
    for step in range(40):
        for e in (1, 2):
            d = {"i": step, "a": np.full(3, step, np.float32), "cfg": {"x": step},
                 "s": f"s{step}", "b": b"b%d" % step}
            if step % 3 == 0:
                d["every3"] = float(step)
            if step >= 10:
                d["late"] = step * 2
            if step in (5, 6):
                d["late"] = "text"
            if step == 7:
                d["a"] = np.zeros(2)
            for k, v in d.items():
                expect[e].setdefault(k, {})[step] = v
            sink.on_publications(rec, e, [(step, time.time(), d, 100)])
    rec.finished = time.time()
    sink.on_task_end(rec)
    sink.close()
    with mpipub.open(path) as run:
        assert run.keys == ["i", "a", "cfg", "s", "b", "every3", "late"]
        assert isinstance(run["every3"][0], np.ndarray)  # two datasets, one dtype: one array
        for ei, e in enumerate(run.engines):
            for k, by_step in expect[e].items():
                steps = run.steps(k)[ei]
                assert steps.tolist() == sorted(by_step), k
                for st, v in zip(steps, run[k][ei]):
                    want = by_step[int(st)]
                    if isinstance(want, dict):
                        assert v == want, (k, st)
                    else:
                        assert np.array_equal(np.asarray(v), np.asarray(want)), (k, st, v)
            for st in range(40):
                assert set(run.data_at(st)[ei]) == {k for k in expect[e] if st in expect[e][k]}
    with h5py.File(path, "r") as f:
        g = f["task_0001/engine_1"]
        index = {r["name"].decode(): (r["kind"], int(r["first"])) for r in g["index"][:]}
        assert index["i"] == (b"int", 0) and index["cfg/x"] == (b"int", 0)
        assert index["every3"] == (b"float", 0) and index["every3@1"] == (b"float", -1)
        assert sorted(g["steps"]) == ["a@2", "every3@1"]  # only sparse datasets have steps


def test_format_1_files_are_still_read_and_newer_ones_refused(tmp_path):
    """A file in format 1 (every dataset with a steps dataset and key/kind/version attrs),
    as mpipub wrote before format 2, reads as before; a newer format is one clear error."""
    import mpipub

    path = tmp_path / "f1.h5"
    with h5py.File(path, "w") as f:
        f.attrs["mpipub_format"] = 1
        t = f.create_group("task_0001")
        t.attrs["task_id"] = 1
        g = t.create_group("engine_1")
        g.attrs["rank"] = 1
        g["step"], g["time"], g["received"] = np.arange(4), np.zeros(4), np.zeros(4)
        for name, key, kind, ver, rows, steps in (
                ("x", "x", "float", 0, np.arange(4) / 2, [0, 1, 2, 3]),
                ("y", "y", "int", 0, np.array([1, 3]), [1, 3]),
                ("y@1", "y", "str", 1, np.array([b"two"], dtype=h5py.string_dtype()), [2])):
            ds = g.create_dataset(f"data/{name}", data=rows)
            ds.attrs["key"], ds.attrs["kind"], ds.attrs["version"] = key, kind, ver
            g[f"steps/{name}"] = np.asarray(steps, dtype=np.int64)
    with mpipub.open(path) as run:
        assert run.keys == ["x", "y"]
        assert run["x"][0].tolist() == [0, 0.5, 1, 1.5]
        assert run.steps("y")[0].tolist() == [1, 2, 3] and run["y"][0] == [1, "two", 3]
        assert run.data_at(2) == [{"x": 1.0, "y": "two"}]
    with h5py.File(path, "r+") as f:
        f.attrs["mpipub_format"] = 3
    with pytest.raises(mpipub.SinkFileError, match="mpipub sink format 3, which this mpipub "
                       "does not read"):
        mpipub.open(path)


def test_value_checker_unit():
    from mpipub.sink.layout import check_value, escape, unescape

    for ok in (1, 2.0, True, 1j, "s", b"b", np.float32(1), np.zeros(3), np.array([b"x"]),
               {"a": {"b": np.ones(2)}}):
        assert check_value("k", ok) is None, ok
    for bad, word in ((object(), "object"), ([1, 2], "numpy.asarray"), (None, "NoneType"),
                      (np.array(["u"]), "dtype <U1"), ({"a": {"b": object()}}, "'b'"),
                      (1 << 70, "64-bit"), (np.array([None]), "dtype object")):
        p = check_value("k", bad)
        assert p and word in p, (bad, p)
    for k in ("a", "a/b", "50%", "x@1", ".", "", "..", "%2F"):
        assert unescape(escape(k)) == k and "/" not in escape(k)


def test_sink_options_rejected_early(tmp_path):
    from mpipub.sink.writer import Sink, SinkError

    (tmp_path / "e.h5").write_bytes(b"keep")
    with pytest.raises(SinkError, match="already exists"):
        Sink(tmp_path / "e.h5")
    assert (tmp_path / "e.h5").read_bytes() == b"keep"
    with pytest.raises(SinkError, match="unknown compression|hdf5plugin"):
        Sink(tmp_path / "c.h5", compression="nope")
    assert not (tmp_path / "c.h5").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))


def test_write_error_is_reported_engines_told_and_flushed_data_kept(mpi_script, tmp_path):
    """A disk that fills up mid-run (simulated with RLIMIT_FSIZE on rank 0): the error names
    the file and step, the running task is aborted with that reason, no new task starts, the
    job ends cleanly, and what was flushed before stays readable."""
    sink = tmp_path / "full.h5"
    job = mpi_script(f"""
        import resource, signal, time
        import numpy as np
        from mpipub import Client, RemoteError, publish_data
        c = Client(sink={str(sink)!r}, flush_interval=0.1)
        def small(n):
            from mpipub import publish_data
            for i in range(n):
                publish_data({{"i": i}})
        c[:].apply_sync(small, 5)               # stored and flushed at the task's end
        import os
        import subprocess, sys
        def flushed():  # the sink writes on its own thread: is task 1 on disk? (read in
            # another process: HDF5 shares an open file within one)
            code = ("import sys, h5py; f = h5py.File(sys.argv[1], 'r', swmr=True, "
                    "locking=False); print(min(f[f'task_0001/engine_{{e}}/step'].shape[0] "
                    "for e in (1, 2)))")
            r = subprocess.run([sys.executable, "-c", code, {str(sink)!r}],
                               capture_output=True, text=True, timeout=30)
            return r.stdout.strip() == "5"
        deadline = time.monotonic() + 30
        while not flushed() and time.monotonic() < deadline:
            time.sleep(0.05)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a failed write, not a dead process
        limit = os.path.getsize({str(sink)!r}) + (2 << 20)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        def big():
            import time
            import numpy as np
            from mpipub import publish_data
            for i in range(400):
                publish_data({{"a": np.full(1 << 16, i)}})       # 512 KiB a step
                time.sleep(0.005)
        ar = c[:].apply_async(big)
        try:
            ar.get(timeout=60)
        except RemoteError as e:
            print("TASK ERROR:", " ".join(str(e).split()))
        else:
            print("NO ERROR")
        try:
            c[:].apply_async(small, 1)
        except Exception as e:
            print("SUBMIT ERROR:", type(e).__name__, e)
        print("END")
    """, nranks=3, timeout=90)
    assert "END" in job.stdout, job.output
    assert "NO ERROR" not in job.stdout, job.output
    assert "TaskAborted: task 2 was aborted because writing sink file" in job.stdout, job.output
    assert "SUBMIT ERROR: SinkError" in job.stdout, job.output
    # reported on stderr with the file and a step
    assert str(sink) in job.stderr and "step" in job.stderr, job.stderr
    # data was lost, so the job says so with its status, after a clean shutdown
    assert job.returncode == 1, job.output
    assert "exiting with status 1 because the sink failed" in job.stderr
    import mpipub
    run = mpipub.open(str(sink))
    first = run.tasks[0]
    assert [d["i"] for d in run.task(first).data_at(4)] == [4, 4]


def _write_in_process(path, pubs_by_engine: dict) -> None:
    """Feed the sink's writer as the client does, every publication queued before it takes
    its first batch (so that the batch that creates the datasets also holds their rows)."""
    import types

    from mpipub.sink.writer import Sink

    engines = sorted(pubs_by_engine)
    rec = types.SimpleNamespace(task_id=1, label="t", submitted=time.time(), engines=engines,
                                hosts=["-"] * (max(engines) + 1), finished=None)
    sink = Sink(path)
    with sink._cv:  # (reentrant: the writer waits until all is queued)
        sink.on_task_start(rec, (print, (), {}))
        for e in engines:
            for step, d in enumerate(pubs_by_engine[e]):
                sink.on_publications(rec, e, [(step, 1000.0 + step, d, 100)])
        rec.finished = time.time()
        sink.on_task_end(rec)
    sink.close()


def _h5_contents(path) -> dict:
    """Every dataset under each engine (but the times rank 0 received): name -> (dtype, shape,
    maxshape, chunks, values)."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and not name.endswith("/received"):
                vals = obj[()].tolist()  # (vlen bytes: a list of arrays, compared as text)
                out[name] = (obj.dtype, obj.shape, obj.maxshape, obj.chunks,
                             repr(vals) if obj.dtype.kind == "O" else vals)
        f.visititems(visit)
    return out


def test_datasets_made_past_h5py_equal_h5pys(tmp_path, monkeypatch):
    """Datasets after the first of each signature are created (and their first rows written)
    through ctypes (sink/h5direct.py), past h5py's per-call work: the file holds what the
    same publications give through h5py alone, chunk layout included."""
    from mpipub.sink import writer

    if writer._DS_CALLS is None:
        pytest.skip("the HDF5 library h5py loaded is not reachable through ctypes")
    rng = np.random.default_rng(5)
    pubs: dict = {1: [], 2: []}
    for e in pubs:
        for step in range(600):  # > 512 rows: more than one chunk in the creating batch
            d = {f"i{j}": int(rng.integers(-9, 9)) + step for j in range(20)}
            d.update({f"x{j}": float(rng.random()) for j in range(5)})
            d.update(flag=step % 2 == 0, z=complex(step, -e), f32=np.float32(step / 7),
                     a=rng.random(3), m=np.arange(6, dtype=np.int16).reshape(2, 3) + step,
                     s=f"s{step}", b=b"b%d" % step, cfg={"x": step, "y": {"w": -step}})
            if step % 3 == 0:
                d.update({f"sp{j}": step * 10 + j for j in range(4)})  # sparse: steps datasets
            if step >= 7:
                d["late"] = np.full(2, step, np.float32)
            pubs[e].append(d)
    counted = {"create": 0}
    calls = writer._DS_CALLS

    def create(*args):
        counted["create"] += 1
        return calls.create(*args)

    fast, slow = tmp_path / "fast.h5", tmp_path / "slow.h5"
    monkeypatch.setattr(writer, "_DS_CALLS", type(calls)(create=create,
                                                         write_chunk=calls.write_chunk,
                                                         close=calls.close))
    _write_in_process(fast, pubs)
    assert counted["create"] > 40  # the fast path made most datasets
    # a chunk write that fails through ctypes is retried through h5py (for its error): here
    # it succeeds there, and h5py's id then owns the dataset (closed once)
    retried = tmp_path / "retried.h5"
    monkeypatch.setattr(writer, "_DS_CALLS", type(calls)(create=calls.create,
                                                         write_chunk=lambda *a: -1,
                                                         close=calls.close))
    _write_in_process(retried, pubs)
    monkeypatch.setattr(writer, "_DS_CALLS", None)
    _write_in_process(slow, pubs)
    a, b, c = _h5_contents(fast), _h5_contents(slow), _h5_contents(retried)
    assert sorted(a) == sorted(b) == sorted(c)
    assert "task_0001/engine_2/steps/sp3@1" in a and "task_0001/engine_1/data/i19" in a
    for name in a:
        assert a[name] == b[name] == c[name], name
    import mpipub

    with mpipub.open(fast) as run:
        for ei, e in enumerate(run.engines):
            assert run["i7"][ei].tolist() == [pubs[e][s]["i7"] for s in range(600)]
            assert run.steps("sp2")[ei].tolist() == list(range(0, 600, 3))
