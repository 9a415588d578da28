"""Rank 0 as a Jupyter kernel: ipykernel, with a client that owns this job's engines.

The client is made before the kernel starts, so ``Client()`` in a cell returns it at once, and
the kernel marks itself its owner: ``Client.close()`` in a cell then leaves the engines running.
The engines stop when the kernel shuts down (or restarts, which is a shutdown and a new job):
they are told to stop; an engine still busy after ``STOP_TIMEOUT_S`` (a task that never calls
publish_data cannot be aborted) ends the job with MPI_Abort, well within the time Jupyter waits
before it signals the launcher.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import traceback

from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp

from mpipub import config
from mpipub.client import client as _client
from mpipub.transport import comm as _comm

#: How long shutdown waits for busy engines before it ends the job (jupyter_client sends
#: SIGTERM after half its shutdown_wait_time, 2.5 s by default).
STOP_TIMEOUT_S = config.get("MPIPUB_KERNEL_STOP_TIMEOUT_S")

_stop_lock = threading.Lock()


def stop_engines() -> None:
    """Stop the engines once; a second caller waits until they are stopped."""
    rt = _client._runtime
    if rt is None:
        return
    with _stop_lock:
        rt.owner = None
        rt.observer = None
        try:
            rt.close(timeout=STOP_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - shutting down: say it, never hang
            sys.__stderr__.write(f"mpipub kernel: stopping the engines failed: {exc!r}\n")


class MpipubKernel(IPythonKernel):
    """IPython's kernel, as rank 0 of an MPI job."""

    implementation = "mpipub"

    def _send_interrupt_children(self):
        # "interrupt kernel" (message mode) interrupts rank 0 only: the engines' tasks keep
        # running (ar.abort() stops them), and idle engines never see a signal.
        os.kill(os.getpid(), signal.SIGINT)

    def do_shutdown(self, restart):
        stop_engines()
        return super().do_shutdown(restart)


def run(world: _comm.World) -> None:
    """Run the kernel on rank 0 until it shuts down, then end the process."""
    from . import forward

    c = _client.Client()
    rt = c._rt
    rt.owner = "jupyter kernel"
    code = 0
    try:
        app = IPKernelApp.instance(kernel_class=MpipubKernel)
        app.initialize(sys.argv[1:])
        rt.observer = forward.CellOutput(app.kernel)
        app.shell.extension_manager.load_extension("mpipub")
        app.start()
    except SystemExit as exc:  # SIGTERM (client.py turns it into SystemExit)
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - os._exit below would end it without a word
        code = 1
        sys.__stderr__.write("mpipub kernel: rank 0 failed, so the kernel ends:\n"
                             + traceback.format_exc())
        if getattr(exc, "errno", None) == errno.EADDRINUSE:
            sys.__stderr__.write(
                "mpipub kernel: a port of the connection file was taken between Jupyter "
                "choosing it and rank 0 binding it (the MPI job's start-up binds ports too); "
                "Jupyter's restarter starts the kernel again (the job that took it has ended by "
                "then, which frees it)\n")
    finally:
        stop_engines()
        for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                s.flush()
            except Exception:  # noqa: BLE001
                pass
        _comm.finalize()
        os._exit(code)
