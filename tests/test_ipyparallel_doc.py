"""docs/ipyparallel.md: every ``python`` block on the page, in order, runs as one script in a
real 4-rank mpiexec job (its asserts are the page's claims)."""

from __future__ import annotations

import re

from conftest import ROOT, ok


def page_code() -> str:
    text = (ROOT / "docs" / "ipyparallel.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) >= 8, "the page's examples were not found"
    return "\n".join(blocks)


def test_every_example_on_the_ipyparallel_page_runs(mpi_script):
    job = mpi_script(page_code() + "\nprint('PAGE OK')\n", nranks=4, timeout=120)
    ok(job, "PAGE OK", "[stdout:1] napping 0.2\n")
