"""What the notebook shows of the engines: their output, live, in the cell that started the
task (``[stdout:1] ...``, as ipyparallel shows it), remote errors as the engine's traceback
instead of a wall of repr, and, on "interrupt kernel", which tasks keep running.
"""

from __future__ import annotations

from mpipub.errors import CompositeError, RemoteError

#: Engines whose traceback a CompositeError shows in full (the others: one line each).
MAX_TRACEBACKS = 4


class CellOutput:
    """The runtime's observer in the kernel (client.py ``_Runtime.observer``): remembers which
    request submitted each task and sends the task's output there as it arrives."""

    def __init__(self, kernel):
        self.kernel = kernel

    def on_submit(self, rec) -> None:
        """(user's thread) The execute request running now started this task."""
        rec.parent = self.kernel.get_parent("shell")

    def on_output(self, rec, engine: int, which: int, text: str) -> None:
        """(I/O thread) Send ``text`` to the task's cell as a stream message."""
        parent = getattr(rec, "parent", None)
        if not parent or not text:
            return
        name = "stdout" if which == 1 else "stderr"
        prefix = f"[{name}:{engine}] "
        out = "".join(prefix + line for line in text.splitlines(keepends=True))
        if not out.endswith("\n"):
            out += "\n"
        k = self.kernel
        try:
            k.session.send(k.iopub_socket, "stream", {"name": name, "text": out},
                           parent=parent, ident=k._topic(name))
        except Exception:  # noqa: BLE001 - the kernel is going away; ar.stdout keeps it
            pass


def running_tasks() -> list:
    """Task records of the kernel's client still running on some engine."""
    from mpipub.client import client as _client

    rt = _client._runtime
    if rt is None:
        return []
    return [r for r in list(rt.records.values()) if r.pending]


def interrupt_note() -> str:
    """What an interrupt leaves running, and how to stop it (empty when nothing runs)."""
    lines = []
    for rec in running_tasks():
        busy = [e for e in rec.engines if not rec.state[e].done]
        lines.append(f"task {rec.task_id} ({rec.label}) keeps running on engines {busy}")
    if not lines:
        return ""
    return ("interrupted the wait only: " + "; ".join(lines) +
            ". Call ar.abort() to stop a task (it stops at its next publish_data); "
            "new tasks queue behind it.")


def remote_error_lines(err: RemoteError) -> list[str]:
    """The engine's traceback, headed by where it ran."""
    if isinstance(err, CompositeError):
        lines = [f"CompositeError: {len(err.errors)} engines failed"]
        lines += [f"  [engine {e.engine_id} on {e.host}] {e.ename}: {e.evalue}"
                  for e in err.errors]
        shown = err.errors[:MAX_TRACEBACKS]
        for e in shown:
            lines += ["", f"[engine {e.engine_id} on {e.host}] remote traceback:",
                      e.traceback.rstrip("\n")]
        if len(err.errors) > len(shown):
            lines.append(f"... and {len(err.errors) - len(shown)} more engines (err.errors)")
        return lines
    return [f"RemoteError: engine {err.engine_id} on {err.host} raised {err.ename}: "
            f"{err.evalue}", "", f"[engine {err.engine_id} on {err.host}] remote traceback:",
            err.traceback.rstrip("\n")]


def show_exception(shell, etype, value, tb, tb_offset=None):
    """IPython custom exception handler for RemoteError and KeyboardInterrupt."""
    if isinstance(value, RemoteError):
        stb = remote_error_lines(value)
    else:
        stb = shell.InteractiveTB.structured_traceback(etype, value, tb, tb_offset=tb_offset)
        note = interrupt_note()
        if note:
            value.args = (note,)  # (the execute reply's evalue is this exception's str)
            stb = [*stb, note]
    shell._showtraceback(etype, value, stb)
    return stb


def install_exception_display(shell) -> None:
    """Render RemoteError readably and explain interrupts (IPython's set_custom_exc)."""
    shell.set_custom_exc((RemoteError, KeyboardInterrupt), show_exception)
