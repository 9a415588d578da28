"""Exceptions that mpipub raises, each with a sentence that says what to do."""

from __future__ import annotations


class MpipubError(RuntimeError):
    """Base class for errors raised by the mpipub runtime itself."""


class LaunchError(MpipubError):
    """The job was started in a way mpipub cannot run in (one rank, no threads, ...)."""


class ConfigError(MpipubError, ValueError):
    """An ``MPIPUB_*`` environment variable has a value mpipub cannot use (mpipub.config)."""


class PublishError(MpipubError, ValueError):
    """``publish_data`` refused a value; the message names the key and the step."""


class TaskNotSendable(MpipubError, TypeError):
    """A task (its function, an argument or a keyword) cannot be serialised; raised on
    rank 0 at submit time, naming the culprit."""


class SinkError(MpipubError):
    """The sink file cannot be created or written."""


class SinkFileError(MpipubError):
    """A path that is not a readable mpipub sink file: missing, not HDF5, or damaged
    (truncated, unreadable metadata); the message says what is wrong or missing."""


class TaskAborted(MpipubError):
    """Raised inside a task on an engine when the client called ``AsyncResult.abort()``."""


class RemoteError(MpipubError):
    """A task raised on an engine.

    Attributes name where and what: ``engine_id`` (the engine's MPI rank), ``host``,
    ``ename`` (exception type name), ``evalue`` (its message), ``traceback`` (the
    engine-side traceback as text) and ``method`` (``"apply"`` or ``"execute"``, for
    ipyparallel's ``[engine:method]`` headers).
    """

    def __init__(self, engine_id: int, host: str, ename: str, evalue: str, traceback: str,
                 method: str = "apply"):
        self.engine_id = engine_id
        self.host = host
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.method = method
        super().__init__(self._summary())

    @staticmethod
    def from_engine(engine_id: int, host: str, ename: str, evalue: str, traceback: str,
                    method: str = "apply") -> RemoteError:
        """The error for what an engine reported: a task that was aborted gives a
        RemoteError that is also a ``TaskAborted``, so ``except TaskAborted`` catches it on
        rank 0 as on the engine."""
        cls = RemoteTaskAborted if ename == "TaskAborted" else RemoteError
        return cls(engine_id, host, ename, evalue, traceback, method)

    def _summary(self) -> str:
        return f"engine {self.engine_id} ({self.host}) raised {self.ename}: {self.evalue}"

    def __str__(self) -> str:
        head = f"--- remote traceback (engine {self.engine_id}) ---"
        return f"{self._summary()}\n{head}\n{self.traceback}"

    def __reduce__(self):
        return (type(self), (self.engine_id, self.host, self.ename, self.evalue, self.traceback,
                             self.method))


class RemoteTaskAborted(RemoteError, TaskAborted):
    """An engine's task was aborted (``AsyncResult.abort()``, or the client closing)."""


class CompositeError(RemoteError):
    """One or more engines of a multi-engine task failed; ``errors`` holds one RemoteError
    each, in engine order. The RemoteError attributes (``engine_id``, ``ename``, ...) are the
    first error's.

    As in ipyparallel: ``elist`` (``(ename, evalue, traceback, engine_info)`` per engine),
    ``render_traceback()`` / ``print_traceback()`` (``[engine:method]`` headers, at most
    ``tb_limit`` tracebacks), ``raise_exception(i)`` (raise the i-th engine's RemoteError).
    A CompositeError whose engines were all aborted is also a ``TaskAborted``.
    """

    #: How many engines' tracebacks ``str()`` and ``render_traceback()`` show.
    tb_limit = 4

    def __init__(self, errors: list[RemoteError]):
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.engine_id, first.host, first.ename, first.evalue, first.traceback,
                         first.method)

    @staticmethod
    def of(errors: list[RemoteError]) -> CompositeError:
        """A CompositeError for ``errors`` (also a TaskAborted when each one is)."""
        if all(isinstance(e, TaskAborted) for e in errors):
            return CompositeTaskAborted(errors)
        return CompositeError(errors)

    @property
    def elist(self) -> list[tuple[str, str, str, dict]]:
        """``(ename, evalue, traceback, engine_info)`` per failed engine (ipyparallel's)."""
        return [(e.ename, e.evalue, e.traceback,
                 {"engine_id": e.engine_id, "host": e.host, "method": e.method})
                for e in self.errors]

    def _summary(self) -> str:
        ids = ", ".join(str(e.engine_id) for e in self.errors)
        n = len(self.errors)
        return f"{n} engine{'s' if n > 1 else ''} failed ({ids})"

    def render_traceback(self, excid: int | None = None) -> list[str]:
        """The engines' tracebacks as lines, each under an ``[engine:method]`` header: the
        ``excid``-th error's only, or the first ``tb_limit`` (with a count of the rest)."""
        chosen = [self.errors[excid]] if excid is not None else self.errors[:self.tb_limit]
        lines: list[str] = []
        for e in chosen:
            lines.append(f"[{e.engine_id}:{e.method}] ({e.host}) {e.ename}: {e.evalue}")
            lines.extend(e.traceback.rstrip("\n").splitlines())
            lines.append("")
        more = len(self.errors) - len(chosen)
        if excid is None and more > 0:
            lines.append(f"... {more} more exception{'s' if more > 1 else ''} "
                         "(CompositeError.errors holds them all)")
        return lines

    _render_traceback_ = render_traceback  # IPython shows this instead of a local traceback

    def print_traceback(self, excid: int | None = None) -> None:
        """Print ``render_traceback(excid)``."""
        print("\n".join(self.render_traceback(excid)))

    def raise_exception(self, excid: int = 0):
        """Raise the ``excid``-th engine's RemoteError (ipyparallel's ``raise_exception``)."""
        if not -len(self.errors) <= excid < len(self.errors):
            raise IndexError(f"an engine error with index {excid} does not exist: this "
                             f"CompositeError holds {len(self.errors)}")
        raise self.errors[excid]

    def __str__(self) -> str:
        lines = [self._summary() + ":"]
        lines += [f"  [engine {e.engine_id} on {e.host}] {e.ename}: {e.evalue}"
                  for e in self.errors]
        lines.append("")
        lines += self.render_traceback()
        return "\n".join(lines).rstrip("\n")

    def __reduce__(self):
        return (type(self), (self.errors,))


class CompositeTaskAborted(CompositeError, TaskAborted):
    """Every failed engine of a multi-engine task was aborted."""
