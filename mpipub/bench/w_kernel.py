"""Row 6k (runs in the driver, not under mpiexec): an mpipub Jupyter kernel with 4 engines
against a plain ipykernel, both started by jupyter_client as Jupyter starts them: start to the
first finished cell, and shutdown until every process of the kernel is gone."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def _processes(pid: int) -> list:
    import psutil

    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _gone(procs: list, timeout: float = 30.0) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            p.kill()
            raise RuntimeError(f"process {p.pid} of a kernel outlived its shutdown")


def one(kernel_dir: Path, name: str) -> tuple[float, float]:
    """(start to first finished cell, shutdown until gone) in seconds."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    from mpipub.notebook import ports

    km = KernelManager(kernel_name=name,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    ports.pin(km)  # both kernels, so that they differ only in what is measured
    t0 = time.monotonic()
    km.start_kernel()
    procs: list = []
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)
        reply = kc.execute_interactive("x = 1 + 1", timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]
        t1 = time.monotonic()
        procs = _processes(km.provisioner.process.pid)
        kc.stop_channels()
        km.shutdown_kernel()
        _gone(procs)
        t2 = time.monotonic()
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)
        for p in procs:
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
    return t1 - t0, t2 - t1


def kernel_times(tmp: Path, engines: int, repeats: int) -> dict:
    """Start and shutdown times of both kernels, alternating (the first round warms up)."""
    from mpipub.notebook import kernelspec

    kdir = tmp / "kernels"
    plain = kdir / "plain"
    plain.mkdir(parents=True, exist_ok=True)
    (plain / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "plain", "language": "python"}))
    kernelspec.install(engines, name="mpipub-bench", prefix=str(tmp))
    pub_dir = tmp / "share" / "jupyter" / "kernels"
    out: dict = {"plain_start": [], "plain_stop": [], "mpipub_start": [], "mpipub_stop": []}
    os.environ.pop("MPLBACKEND", None)
    for i in range(repeats + 1):
        order = (("plain", kdir), ("mpipub-bench", pub_dir))
        for name, where in (order if i % 2 == 0 else order[::-1]):
            start, stop = one(where, name)
            if i:
                key = "plain" if name == "plain" else "mpipub"
                out[f"{key}_start"].append(start)
                out[f"{key}_stop"].append(stop)
    return out
