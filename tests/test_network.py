"""Publications over MPICH's network module, not its shared memory: on one machine
``MPIR_CVAR_NOLOCAL=1`` with the OFI netmod and libfabric's ``tcp`` provider sends every
message over TCP sockets, the path engines on other nodes take (docs/benchmarks.md,
"The network path"). Any other test runs that way with the same variables set
(``NETWORK_ENV``; the tests' jobs inherit the environment).
"""

from __future__ import annotations

import subprocess

import pytest

from conftest import PYTHON, ok

#: MPICH's network path on one machine: every rank is treated as remote, and messages go
#: through libfabric's tcp provider (UCX with NOLOCAL alone keeps its shared-memory transports)
NETWORK_ENV = {"MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}


def _is_mpich() -> bool:
    r = subprocess.run([PYTHON, "-c", "import mpi4py; mpi4py.rc.initialize = False\n"
                        "from mpi4py import MPI; print(MPI.Get_library_version())"],
                       capture_output=True, text=True, timeout=60)
    return "MPICH" in r.stdout


pytestmark = pytest.mark.skipif(not _is_mpich(), reason="MPICH's network module only")


def test_stream_over_tcp(mpi_script):
    job = mpi_script("""
        import numpy as np
        from mpipub import Client, publish_data
        from mpi4py import MPI

        def steps(n, size):
            a = np.empty(size // 8)
            for i in range(n):
                a[:] = i + 1000 * MPI.COMM_WORLD.Get_rank()
                publish_data({"a": a, "i": i})
            return n

        c = Client()  # (each task below stays within the 64 MiB history)
        for n, size in ((300, 64 << 10), (20, 1 << 20), (2, 8 << 20)):
            ar = c[:].apply_async(steps, n, size)
            assert ar.get(timeout=100) == [n, n, n]
            for e, d in zip(c.ids, ar.data):
                assert d["i"] == n - 1 and d["a"][-1] == n - 1 + 1000 * e, (e, d["i"])
            seen = {e: 0 for e in c.ids}
            for p in ar.stream(timeout=30):
                assert p.step == p.data["i"] == seen[p.engine], (p.engine, p.step)
                assert p.data["a"].nbytes == size and p.data["a"][0] == p.step + 1000 * p.engine
                seen[p.engine] += 1
            assert seen == {e: n for e in c.ids}, seen
        print("OK tcp")
    """, nranks=4, timeout=180, env=NETWORK_ENV | {"MPIR_CVAR_DEBUG_SUMMARY": "1"})
    ok(job, "OK tcp")
    assert "provider: tcp" in job.output, "the job did not use libfabric's tcp provider"
