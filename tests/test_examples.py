"""The examples and the seed snippet, run as a user would, with their output checked."""

from __future__ import annotations

import numpy as np

from conftest import ROOT, run_mpi


def _png_colours(path) -> int:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200, img.shape
    rgb = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    return len(np.unique(rgb, axis=0))


def test_simulation_loop_example_writes_its_plot(tmp_path):
    out = tmp_path / "sl.png"
    job = run_mpi(5, [str(ROOT / "examples" / "simulation_loop.py"), "--steps", "3",
                      "--interval", "0.05", "-o", str(out)], timeout=90, cwd=tmp_path)
    assert job.returncode == 0, job.output
    assert "last step [2, 2, 2, 2] from engines [1, 2, 3, 4]" in job.stdout, job.output
    # four coloured lines, a title and a legend: far more than a blank canvas's colours
    assert _png_colours(out) > 50


def test_simple_publication_example(tmp_path):
    job = run_mpi(3, [str(ROOT / "examples" / "simple_publication.py"), "--steps", "4",
                      "--interval", "0.05"], timeout=60, cwd=tmp_path)
    assert job.returncode == 0, job.output
    assert "final ar.data: [{'i': 3}, {'i': 3}]" in job.stdout, job.output


SEED = '''
from mpipub import Client                      # was: from IPython.parallel import Client
from matplotlib.pyplot import plot, savefig, legend
import time

c = Client(); dv = c[:]; dv.block = False
def simulation_loop():
    from mpipub import publish_data            # was: from IPython.zmq.datapub import publish_data
    import time, numpy as np
    for i in range(10):
        publish_data(dict(a=np.random.rand(20), i=i)); time.sleep(1)
ar = dv.apply_async(simulation_loop)
time.sleep(2.5)                                # the pause between two notebook cells
data = ar.data            # [{'a': array, 'i': 3}, ...] one per engine, refreshed as steps arrive
for k, d in enumerate(data): plot(d['a'], label='engine: %d' % k)   # matplotlib
legend(); savefig("seed.png")
print("steps seen:", [d['i'] for d in data])
'''


def test_seed_snippet_runs_with_only_imports_changed(tmp_path):
    (tmp_path / "seed.py").write_text(SEED)
    job = run_mpi(4, [str(tmp_path / "seed.py")], timeout=90, cwd=tmp_path)
    assert job.returncode == 0, job.output
    line = [ln for ln in job.stdout.splitlines() if ln.startswith("steps seen:")][0]
    steps = eval(line.split(":", 1)[1])
    # 2.5 s into a task publishing once a second: steps 0 to 3 (0 on a machine slow to start
    # the task; the snippet's own sleep is the user's, not the test's synchronisation)
    assert len(steps) == 3 and all(0 <= s <= 3 for s in steps), line
    assert _png_colours(tmp_path / "seed.png") > 20
    # the script ended while the loop still ran: the client said so and stopped it cleanly
    assert "aborting it" in job.stderr, job.stderr
