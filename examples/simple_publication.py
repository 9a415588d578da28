"""The first Data Publication API example: each engine publishes a counter every interval.

    mpiexec -n 3 python examples/simple_publication.py [--steps 10] [--interval 1]
"""

import argparse
import time

from mpipub import Client

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=10)
parser.add_argument("--interval", type=float, default=1.0)
opts = parser.parse_args()

rc = Client()
view = rc[:]


def simple_publication(steps, interval):
    """Simple publication function: publishes a number every interval."""
    import time

    from mpipub import publish_data

    for i in range(steps):
        publish_data(dict(i=i))
        time.sleep(interval)


ar = view.apply_async(simple_publication, opts.steps, opts.interval)
seen = None
while not ar.ready():
    now = [d.get("i") for d in ar.data]
    if now != seen:
        print("ar.data:", ar.data, flush=True)
        seen = now
    time.sleep(opts.interval / 4)
ar.get()
print("final ar.data:", ar.data)
