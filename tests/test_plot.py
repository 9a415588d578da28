"""``mpipub.plot.live`` outside Jupyter (a PNG rewritten in place) and ``AsyncResult.data_at``:
from a running task, aligned across engines that run at different speeds, and from a sink file
that another job is still writing."""

from __future__ import annotations

import time

import pytest

from conftest import finish, kill_group, ok, start_mpi

# Every frame the plot draws is recorded (render is wrapped, the drawing itself still runs).
RECORD = """
import mpipub, mpipub.plot as P
frames = []
_render = P.render
def render(key, frame, series, title, dpi=80):
    frames.append((title, {e: (None if v is None else __import__("numpy").asarray(v).copy())
                           for e, v in frame.items()}, series))
    if len(frames) == 3:
        open("drawn3", "w").close()  # (the engines' task ends only once 3 frames are drawn)
    return _render(key, frame, series, title, dpi)
P.render = render
"""


def test_live_png_aligned_and_data_at(mpi_script, tmp_path):
    job = mpi_script(RECORD + f"""
import numpy as np
from mpipub import Client
c = Client()
def sim(n):
    import time, numpy as np
    from mpipub import publish_data, engine_comm
    r = engine_comm().Get_rank()   # engine 1 is 3x faster than engine 2
    for i in range(n):
        publish_data({{"tile": np.full((4, 4), i), "x": float(i), "line": np.arange(5) * i}})
        time.sleep(0.02 if r == 0 else 0.06)
    import os
    deadline = time.monotonic() + 60   # running until the plot has drawn 3 frames, however
    while not os.path.exists("drawn3") and time.monotonic() < deadline:  # slow it draws
        time.sleep(0.01)
    return n
ar = c[:].apply_async(sim, 100)
png = {str(tmp_path / "tile.png")!r}
assert P.live(ar, "tile", interval=0.2, aligned=True, png=png) == png
assert ar.ready()
data = open(png, "rb").read()
assert data[:8] == b"\\x89PNG\\r\\n\\x1a\\n", data[:8]
assert len(frames) >= 3, len(frames)
for title, frame, _ in frames:
    vals = {{e: int(v.flat[0]) for e, v in frame.items() if v is not None}}
    if vals:  # every engine's tile from one step, the one in the title
        assert len(vals) == 2 and len(set(vals.values())) == 1, (title, vals)
        assert f"step {{vals[1]}}" in title, (title, vals)
assert "step 99" in frames[-1][0] and "(done)" in frames[-1][0], frames[-1][0]
# data_at: what each engine published at a step, None where it did not
d = ar.data_at(7)
assert [int(x["tile"][0, 0]) for x in d] == [7, 7] and d[0]["x"] == 7.0
assert ar.data_at(100) == [None, None]
assert c[1].apply_async(lambda: 1).data_at(0) is None
# scalars: a time series per engine, to the last step
frames.clear()
P.live(ar, "x", png={str(tmp_path / "x.png")!r})
title, frame, series = frames[-1]
assert sorted(series) == [1, 2] and series[1][0] == list(range(100)), series
# 1-D lines, latest mode; a non-numeric key is a one-line TypeError naming key and engine
P.live(ar, "line", png={str(tmp_path / "line.png")!r})
ar2 = c[:].apply_async(lambda: mpipub.publish_data({{"s": "text"}}))
try:
    P.live(ar2, "s", png={str(tmp_path / "s.png")!r})
except TypeError as exc:
    assert "'s'" in str(exc) and "engine" in str(exc), exc
    print("refused", exc)
print("OK")
""", nranks=3, timeout=120)
    ok(job, "OK", "refused")


@pytest.mark.timeout(180)
def test_live_from_a_sink_file_being_written(tmp_path, monkeypatch):
    """A file another job is writing plots live and returns when that task ends."""
    import mpipub
    import mpipub.plot as P

    sink = tmp_path / "run.h5"
    writer = tmp_path / "writer.py"
    writer.write_text(f"""
import time
from mpipub import Client
c = Client(sink={str(sink)!r}, flush_interval=0.1)
def sim(n):
    import time
    from mpipub import publish_data
    for i in range(n):
        publish_data({{"x": float(i)}})
        time.sleep(0.05)
c[:].apply_sync(sim, 60)
""")
    proc = start_mpi(3, [str(writer)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        run = None
        while run is None or not run.tasks or not run.task().keys:
            assert time.monotonic() < deadline and proc.poll() is None, "no task in the file"
            time.sleep(0.1)
            if run is not None:
                run.close()
            try:
                run = mpipub.open(sink)
            except Exception:  # noqa: BLE001 - not created yet
                run = None
        frames = []
        real = P.render

        def render(key, frame, series, title, dpi=80):
            frames.append((title, series))
            return real(key, frame, series, title, dpi)

        monkeypatch.setattr(P, "render", render)
        png = tmp_path / "x.png"
        assert P.live(run, "x", interval=0.2, png=png, timeout=90) == str(png)
        assert frames and "(done)" in frames[-1][0], frames[-1][0]
        assert len(frames) >= 2  # drawn while the file grew, then at the end
        series = frames[-1][1]
        assert series[1][0] == list(range(60)) and series[2][0] == list(range(60))
        run.close()
        ok(finish(proc, 60))
    finally:
        kill_group(proc)
