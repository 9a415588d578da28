"""The kernel's entry point, run on every rank of the job: ``python -m mpipub.notebook.kernel
-f CONNECTION_FILE`` (what ``mpipub kernel install`` writes into the kernelspec's argv).

Rank 0 becomes the Jupyter kernel (ipykernel, see ``ipkernel``); every other rank serves as an
engine until the kernel stops it, and never imports ipykernel.

Every rank also ends itself when its launcher dies. ``shutdown_kernel(now=True)`` SIGKILLs the
launcher's process group only, and the ranks are not in it (hydra gives each rank a session
of its own; Open MPI's prterun a process group of its own). Hydra's proxy then kills its ranks,
but under Open MPI an engine busy in a task that never calls MPI was left running.
"""

from __future__ import annotations

import os
import threading
import time

#: How often each rank checks that the process that started it is still there (seconds).
PARENT_CHECK_S = 0.5


def _exit_with_launcher() -> None:
    """End this process (a daemon thread's ``os._exit``) once its parent has gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="mpipub-launcher-watch", daemon=True).start()


def main() -> None:
    from mpipub.transport import comm

    _exit_with_launcher()
    world = comm.world()
    if world.rank != comm.CLIENT_RANK:
        from mpipub.engine.loop import serve_and_exit

        serve_and_exit(world)
    from .ipkernel import run

    run(world)


if __name__ == "__main__":
    main()
