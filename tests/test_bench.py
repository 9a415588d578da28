"""The benchmark suite works (``python -m mpipub.bench --quick``): it runs its mpiexec jobs and
writes a well-formed JSON, table and chart. It never asserts a speed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import MPIEXEC, mpi_env

pytestmark = pytest.mark.skipif(not MPIEXEC, reason="mpiexec not found")


def test_bench_quick(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "mpipub.bench", "--quick", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mpi_env(), cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"bench --quick did not finish in 300 s\n{stdout}\n{stderr}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, stdout + stderr
    res = json.loads((out / "latest.json").read_text())
    assert res["meta"]["quick"] is True
    assert {"cpu", "cores", "mpi", "mpi4py"} <= set(res["meta"]["machine"])
    rows = res["rows"]
    got = {r["row"] for r in rows}
    assert {"1", "2", "3", "4", "5", "6", "8"} <= got, got
    assert "7" in got  # measured, or marked pending
    for r in rows:
        if r.get("pending"):
            continue
        assert not r.get("error"), r
        for side in ("baseline", "mpipub"):
            reps = r[side]["repeats"]
            assert reps and all(isinstance(x, (int, float)) and x >= 0 for x in reps), r
        assert isinstance(r["ratio"], (int, float)) and r["ratio"] >= 0
        assert r["met"] is None or isinstance(r["met"], bool)
    # throughput rows: ratio against raw (a) (one reused buffer), (b) (a ring as large as the
    # default history) beside it, and row 1's (c) and raw + sender copy (issue 17)
    for r in rows:
        if r["row"] in ("1", "7", "8") and not r.get("pending"):
            b = r["baselines"]
            assert {"reuse", "ring"} <= set(b), r
            assert r["baseline"]["median"] == b["reuse"]["median"], r
            assert "1.0 of (b)" in r["floor"]
            for k in b.values():
                assert k["median"] > 0 and k["ratio"] == r["mpipub"]["median"] / k["median"]
            if r["row"] == "1":
                assert {"fresh", "rawcopy"} <= set(b), r
            if r["row"] == "8":
                assert 0 <= min(r["rank0_cpu"]["copy"]) and max(r["rank0_cpu"]["copy"]) < 4, r
    assert res["raw"], "the JSON keeps every job's raw repeats"
    png = (out / "latest.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    md = (out / "latest.md").read_text()
    assert "| # | what |" in md and md.count("\n|") >= len(rows) + 1
    assert "| vs (b) | vs (c) | vs raw + copy |" in md
    assert "| # | what |" in stdout
