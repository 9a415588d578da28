"""The seed example of IPython.parallel's Data Publication API, on mpipub.

    mpiexec -n 5 python examples/simulation_loop.py            # 4 engines, 10 steps, 1 s apart
    mpiexec -n 5 python examples/simulation_loop.py --steps 3 --interval 0.1 -o out.png

Every engine publishes a random array each step; rank 0 watches ``ar.data`` while the engines
run and, at the end, plots every engine's latest array to simulation_loop.png.
"""

import argparse
import time

import matplotlib

matplotlib.use("Agg")  # write a file; no screen needed
import matplotlib.pyplot as plt  # noqa: E402

from mpipub import Client  # noqa: E402  (the only line that differs from IPython.parallel)

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=10, help="time steps per engine")
parser.add_argument("--interval", type=float, default=1.0, help="seconds between steps")
parser.add_argument("-o", "--output", default="simulation_loop.png", help="PNG to write")
opts = parser.parse_args()

c = Client()
dv = c[:]
dv.block = False


def simulation_loop(steps, interval):
    import numpy as np

    from mpipub import publish_data

    for i in range(steps):
        publish_data(dict(a=np.random.rand(20), i=i))
        time.sleep(interval)


ar = dv.apply_async(simulation_loop, opts.steps, opts.interval)

# Watch the data while the engines run: it is refreshed as steps arrive.
while not ar.wait(max(opts.interval, 0.05)):
    steps = [d.get("i") for d in ar.data]
    print(f"latest step per engine: {steps}", flush=True)
ar.get()  # raises if an engine failed; afterwards ar.data holds every engine's last step

data = ar.data
fig, ax = plt.subplots()
for k, d in zip(c.ids, data):
    ax.plot(d["a"], label="engine: %d" % k)  # noqa: UP031 (the seed's own line)
ax.set_title(f"Data published at time step: {data[0]['i']}")
ax.legend(loc="upper right")
fig.savefig(opts.output)
print(f"wrote {opts.output}: last step {[d['i'] for d in data]} from engines {c.ids}")
