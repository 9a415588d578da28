"""The kernel's entry point, run on every rank of the job: ``python -m mpipub.notebook.kernel
-f CONNECTION_FILE`` (what ``mpipub kernel install`` writes into the kernelspec's argv).

Rank 0 becomes the Jupyter kernel (ipykernel, see ``ipkernel``); every other rank serves as an
engine until the kernel stops it, and never imports ipykernel.
"""

from __future__ import annotations


def main() -> None:
    from mpipub import comm

    world = comm.world()
    if world.rank != comm.CLIENT_RANK:
        from mpipub.engine import serve_and_exit

        serve_and_exit(world)
    from .ipkernel import run

    run(world)


if __name__ == "__main__":
    main()
