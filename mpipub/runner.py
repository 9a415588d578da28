"""``python -m mpipub run SCRIPT [ARGS]``: the script runs on rank 0 only, engines serve.

Like ``python -m mpi4py.futures``: every rank starts the runtime; rank 0 runs the script as
``__main__`` with ``sys.argv`` as given; the exit status is the script's.
"""

from __future__ import annotations

import os
import sys

from .transport import comm as _comm


def run_script(script: str, args: list[str], sink: str | None = None,
               sink_options: dict | None = None) -> int:
    """Run ``script`` on rank 0 with engines on the other ranks; return its exit status."""
    world = _comm.world()
    if world.rank != _comm.CLIENT_RANK:
        from .engine.loop import serve_and_exit  # engines never import the client side

        serve_and_exit(world)
    import runpy
    import traceback

    from .client import client as _client

    if not os.path.isfile(script):
        sys.stderr.write(f"mpipub run: no such script: {script}\n")
        _client.Client()  # so that close() stops the engines
        _client._close_at_exit()
        return 2
    _client.Client(sink=sink, **(sink_options or {}))
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException as exc:  # noqa: BLE001 - printed once, like Python would, then stop
        sys.stderr.write("".join(traceback.format_exception(type(exc), exc,
                                                            _script_frames(exc.__traceback__))))
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
    finally:
        sys.stdout.flush()
        _client._close_at_exit(code)
    return code


def _script_frames(tb):
    """The traceback from the script's first frame on, as ``python script.py`` would print it
    (without this module's and runpy's frames)."""
    start = tb
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name != __file__ and "runpy" not in name:
            return tb
        tb = tb.tb_next
    return start


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")
    return 1
