"""Kernel ports that the MPI job's own start-up cannot take.

jupyter_client picks five free TCP ports, writes them to the connection file and starts the
kernelspec's argv; rank 0 binds them only after ``mpiexec``, its proxies and every rank's
``MPI_Init`` have bound ports of their own. Those are ephemeral ports (bound to port 0), drawn
from the same range jupyter_client's picks come from, so now and then one of the kernel's ports
is gone before rank 0 binds it ("Address already in use": it failed a CI run). Jupyter's
restarter then starts the kernel again; code that starts mpipub kernels itself with
jupyter_client (the tests, ``mpipub.bench``) calls ``pin`` first: ports outside the ephemeral
range are never handed out to a bind on port 0.
"""

from __future__ import annotations

import random
import socket
import warnings
from pathlib import Path
from typing import Any

#: Where Linux keeps the ephemeral range; elsewhere Linux's default range is assumed.
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_DEFAULT_RANGE = (32768, 60999)
#: Ports below this are left to services (SLURM's daemons use 6817-6819, for one).
_LOWEST = 10000

PORT_NAMES = ("shell_port", "iopub_port", "stdin_port", "hb_port", "control_port")


def ephemeral_range() -> tuple[int, int]:
    """The OS's ephemeral port range (inclusive), where a bind on port 0 gets its port."""
    try:
        lo, hi = (int(w) for w in _RANGE_FILE.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return _DEFAULT_RANGE


def _free(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, port))
        except OSError:
            return False
    return True


def outside_ephemeral(count: int, ip: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports, free now, that no bind on port 0 can be given."""
    lo, hi = ephemeral_range()
    candidates = [*range(_LOWEST, lo), *range(hi + 1, 65536)]
    random.shuffle(candidates)
    ports = [p for p in candidates[:50 * count] if _free(ip, p)][:count]
    if len(ports) < count:
        raise RuntimeError(f"fewer than {count} free ports outside the ephemeral range "
                           f"{lo}-{hi} on {ip}")
    return ports


def pin(km: Any) -> None:
    """Give a tcp jupyter_client KernelManager, before ``start_kernel()``, five ports outside the
    ephemeral range (and stop it picking its own): restarts keep them. Where the range
    leaves no room, it warns and leaves the picking to jupyter_client."""
    if km.transport != "tcp":
        return
    try:
        ports = outside_ephemeral(len(PORT_NAMES), km.ip)
    except RuntimeError as exc:  # no room outside the range: jupyter_client picks, as ever
        warnings.warn(f"mpipub.notebook.ports: {exc}; the kernel's ports are picked by "
                      "jupyter_client", stacklevel=2)
        return
    km.cache_ports = False
    for name, port in zip(PORT_NAMES, ports):
        setattr(km, name, port)
