"""Exceptions that mpipub raises, each with a sentence that says what to do."""

from __future__ import annotations


class MpipubError(RuntimeError):
    """Base class for errors raised by the mpipub runtime itself."""


class LaunchError(MpipubError):
    """The job was started in a way mpipub cannot run in (one rank, no threads, ...)."""


class PublishError(ValueError):
    """``publish_data`` refused a value; the message names the key and the step."""


class TaskAborted(MpipubError):
    """Raised inside a task on an engine when the client called ``AsyncResult.abort()``."""


class RemoteError(MpipubError):
    """A task raised on an engine.

    Attributes name where and what: ``engine_id`` (the engine's MPI rank), ``host``,
    ``ename`` (exception type name), ``evalue`` (its message) and ``traceback`` (the
    engine-side traceback as text).
    """

    def __init__(self, engine_id: int, host: str, ename: str, evalue: str, traceback: str):
        self.engine_id = engine_id
        self.host = host
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        super().__init__(self._summary())

    def _summary(self) -> str:
        return f"engine {self.engine_id} ({self.host}) raised {self.ename}: {self.evalue}"

    def __str__(self) -> str:
        head = f"--- remote traceback (engine {self.engine_id}) ---"
        return f"{self._summary()}\n{head}\n{self.traceback}"

    def __reduce__(self):
        return (type(self), (self.engine_id, self.host, self.ename, self.evalue, self.traceback))


class CompositeError(RemoteError):
    """Several engines failed in one multi-engine task; ``errors`` holds one RemoteError each."""

    def __init__(self, errors: list[RemoteError]):
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.engine_id, first.host, first.ename, first.evalue, first.traceback)

    def _summary(self) -> str:
        ids = ", ".join(str(e.engine_id) for e in self.errors)
        return f"{len(self.errors)} engines failed ({ids})"

    def __str__(self) -> str:
        lines = [self._summary() + ":"]
        lines += [f"  [engine {e.engine_id} on {e.host}] {e.ename}: {e.evalue}"
                  for e in self.errors]
        lines.append(f"--- remote traceback (engine {self.engine_id}) ---\n{self.traceback}")
        return "\n".join(lines)

    def __reduce__(self):
        return (type(self), (self.errors,))
