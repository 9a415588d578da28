"""Reading sink files: ``mpipub.open(path)`` -> ``Run``. Works on a finished file and on one
being written (``refresh()`` picks up what was written since). Nothing is unpickled: values
are rebuilt from datasets and their kind (see ``mpipub.sink.layout``).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import h5py
import numpy as np

from ..errors import SinkFileError
from . import layout as L
from .h5file import FLAG_SWMR_WRITE, open_swmr, superblock


def _superblock_or_none(path):
    try:
        return superblock(path)
    except OSError:
        return None


class _DamagedRead(SinkFileError):
    """A dataset that HDF5 could not read: retried (``Run._reading``) while a writer is live,
    which may be creating objects outside SWMR mode at that moment."""


class _Truncated(OSError):
    """The file is shorter than the end-of-file address HDF5 recorded in it."""

    def __init__(self, sb):
        super().__init__("truncated")
        self.sb = sb


class _Leaf:
    """One dataset of a key. Sparse (format 1, or ``first`` == -1): its steps are the dataset
    ``idx``; dense (``first`` >= 0, format 2): row i is the engine's publication ``first + i``."""

    __slots__ = ("ds", "idx", "kind", "version", "first", "_esteps", "_steps", "_f")

    def __init__(self, f, ds, idx, kind, version, first=-1, esteps=None):
        self._f, self.ds, self.idx, self.kind, self.version = f, ds, idx, kind, version
        self.first, self._esteps = first, esteps
        self._steps = None

    def _damaged(self, exc: Exception) -> SinkFileError:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        return _DamagedRead(f"{self._f.filename}: damaged: cannot read {self.ds}: "
                             f"{' '.join(str(msg).split())}")

    def dataset(self) -> h5py.Dataset:
        """Its h5py dataset (a ``SinkFileError`` naming it where HDF5 cannot open it)."""
        try:
            return self._f[self.ds]
        except (OSError, KeyError) as exc:
            raise self._damaged(exc) from None

    def steps(self) -> np.ndarray:
        if self._steps is None:
            try:
                d = self._f[self.ds]
                if self.first >= 0:  # dense: as many rows as the engine's steps cover
                    n = max(0, min(d.shape[0], len(self._esteps) - self.first))
                    self._steps = self._esteps[self.first:self.first + n]
                else:
                    i = self._f[self.idx]
                    n = min(d.shape[0], i.shape[0])
                    self._steps = np.asarray(i[:n])
            except (OSError, KeyError) as exc:
                raise self._damaged(exc) from None
        return self._steps

    def first_step(self) -> int:
        """The step of its first row (1 << 62 while it has none), without reading a dense
        dataset."""
        if self.first >= 0:
            return int(self._esteps[self.first]) if self.first < len(self._esteps) else 1 << 62
        st = self.steps()
        return int(st[0]) if len(st) else 1 << 62

    def rows(self):
        n = len(self.steps())
        try:
            return self._f[self.ds][:n]
        except (OSError, KeyError) as exc:
            raise self._damaged(exc) from None

    def row(self, pos: int):
        try:
            return L.to_python(self.kind, self._f[self.ds][pos])
        except (OSError, KeyError) as exc:
            raise self._damaged(exc) from None

    def values(self) -> list:
        return [L.to_python(self.kind, r) for r in self.rows()]


_NUMERIC = ("array", "npscalar", "int", "float", "bool", "complex")


class EngineData:
    """One engine's part of one task: steps, times and the stored leaves."""

    def __init__(self, f, group: str, fmt: int = L.FORMAT):
        self._f = f
        g = f[group]
        self.group = group
        self.rank = int(g.attrs.get("rank", -1))
        self.host = str(g.attrs.get("host", ""))
        n = min(g["step"].shape[0], g["time"].shape[0], g["received"].shape[0])
        self.steps = np.asarray(g["step"][:n])
        self.times = np.asarray(g["time"][:n])
        self.received = np.asarray(g["received"][:n])
        self.leaves: dict[tuple, list[_Leaf]] = {}
        self._keys: list[str] | None = None  # (a snapshot: refresh() makes new objects)
        self._by_top: dict | None = None
        if fmt >= 2:
            if "index" in g:
                self._read_index(g["index"], group)
        elif "data" in g:
            self._scan(g["data"], f"{group}/data", f"{group}/steps", ())
        for v in self.leaves.values():
            if len(v) > 1:
                v.sort(key=_Leaf.first_step)

    def _read_index(self, ds, group: str) -> None:
        """Format 2: the leaves from the engine's ``index`` (one row per dataset)."""
        for name, kind, version, first in ds[:].tolist():
            name = name.decode("utf-8") if isinstance(name, bytes) else str(name)
            key = tuple(L.unescape(part) for part in name.split("/"))
            first = int(first)
            self.leaves.setdefault(key, []).append(
                _Leaf(self._f, f"{group}/data/{name}",
                      None if first >= 0 else f"{group}/steps/{name}",
                      kind.decode("ascii") if isinstance(kind, bytes) else str(kind),
                      int(version), first, self.steps))

    def _scan(self, grp, dpath, spath, prefix):
        for name, obj in grp.items():
            if obj is None:  # a link HDF5 cannot follow (yet: the writer is creating it)
                raise KeyError(f"{dpath}/{name}")
            key = prefix + (L.unescape(name),)
            if isinstance(obj, h5py.Group):
                self._scan(obj, f"{dpath}/{name}", f"{spath}/{name}", key)
            else:
                self.leaves.setdefault(key, []).append(
                    _Leaf(self._f, f"{dpath}/{name}", f"{spath}/{name}",
                          str(obj.attrs.get("kind", "array")), int(obj.attrs.get("version", 0))))

    @property
    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = self._order_keys()
        return self._keys

    def _order_keys(self) -> list[str]:
        first: dict[str, int] = {}
        for path, leaves in self.leaves.items():
            s = min(lf.first_step() for lf in leaves)
            first[path[0]] = min(first.get(path[0], 1 << 62), s)
        return sorted(first, key=lambda k: first[k])  # stable: file (creation) order

    def _under(self, key: tuple):
        if not key:
            return [(p, lf) for p, lfs in self.leaves.items() for lf in lfs]
        if self._by_top is None:  # leaves by top-level key: a lookup is not a scan of all
            self._by_top = {}
            for p, lfs in self.leaves.items():
                self._by_top.setdefault(p[0], []).append((p, lfs))
        return [(p, lf) for p, lfs in self._by_top.get(key[0], ()) if p[: len(key)] == key
                for lf in lfs]

    def value_at(self, key: tuple, step: int):
        """Value of ``key`` published at ``step``, or KeyError."""
        found = False
        out: Any = None
        for p, lf in self._under(key):
            st = lf.steps()
            i = int(np.searchsorted(st, step))
            if i < len(st) and st[i] == step:
                v = lf.row(i)
                if len(p) == len(key):
                    return v
                found = True
                if out is None:
                    out = {}
                d = out
                for k in p[len(key):-1]:
                    d = d.setdefault(k, {})
                d[p[-1]] = v
        if not found:
            raise KeyError(key)
        return out

    def last_step(self, key: tuple) -> int | None:
        s = [int(lf.steps()[-1]) for _, lf in self._under(key) if len(lf.steps())]
        return max(s) if s else None

    def data(self) -> dict:
        out = {}
        for k in self.keys:
            s = self.last_step((k,))
            if s is not None:
                out[k] = self.value_at((k,), s)
        return out

    def data_at(self, step: int) -> dict | None:
        if not len(self.steps) or step not in set(self.steps.tolist()):
            return None
        out = {}
        for k in self.keys:
            try:
                out[k] = self.value_at((k,), step)
            except KeyError:
                pass
        return out

    def series(self, key: tuple):
        """(steps, values): values stacked with the step first when they allow it."""
        items = self._under(key)
        if not items:
            raise KeyError(key)
        exact = [lf for p, lf in items if len(p) == len(key)]
        if len(items) == 1 and len(exact) == 1:
            lf = exact[0]
            st = lf.steps()
            if lf.kind in _NUMERIC:
                return st, np.asarray(lf.rows())
            return st, lf.values()
        if len(exact) == len(items) and len({lf.kind for lf in exact}) == 1 \
                and exact[0].kind in _NUMERIC:
            # datasets of one signature (a key that skipped publications continues in a
            # new dataset): one array, in step order
            parts = [np.asarray(lf.rows()) for lf in exact]
            if len({(p.dtype, p.shape[1:]) for p in parts}) == 1:
                st = np.concatenate([lf.steps() for lf in exact])
                order = np.argsort(st, kind="stable")
                return st[order], np.concatenate(parts)[order]
        steps = sorted({int(s) for _, lf in items for s in lf.steps()})
        return np.asarray(steps, dtype=np.int64), [self.value_at(key, s) for s in steps]


class TaskData:
    """One task in a sink file: ``engines``, ``keys``, ``data``, ``data_at(step)``,
    ``run[key]``, ``steps(key)``."""

    def __init__(self, f, group: str, fmt: int = L.FORMAT):
        g = f[group]
        a = g.attrs
        self.group = group
        self.task_id = int(a.get("task_id", 0))
        self.label = str(a.get("label", ""))
        self.function = str(a.get("function", ""))
        self.args = str(a.get("args", ""))
        self.kwargs = str(a.get("kwargs", ""))
        self.start = float(a.get("start", np.nan))
        self.end = float(a.get("end", np.nan))
        #: why the job ended while this task ran (e.g. SIGTERM from scancel); None if it did not
        self.cut_short = str(a["cut_short"]) if "cut_short" in a else None
        self._eng: dict[int, EngineData] = {}
        self._keys: dict[str, None] | None = None
        #: the Run that made it: reads retried on a fresh open while a live writer tears them
        self._run: Run | None = None
        for name in g:
            if name.startswith("engine_"):
                try:
                    e = EngineData(f, f"{group}/{name}", fmt)
                except OSError as exc:
                    raise _DamagedRead(f"{f.filename}: damaged: cannot read {group}/{name}: "
                                       f"{' '.join(str(exc).split())}") from None
                self._eng[e.rank] = e
        self.engines = sorted(self._eng)

    def __repr__(self) -> str:
        return f"<mpipub task {self.task_id} {self.label} engines {self.engines}>"

    def engine(self, e: int) -> EngineData:
        return self._eng[e]

    def _read(self, read):
        """``read(task)``, on this task as the latest open of the file holds it: a read torn by
        a live writer is retried on a fresh open (``Run._reading``)."""
        run = self._run
        if run is None:
            return read(self)
        return run._reading(lambda: read(run._tasks.get(self.task_id, self)))

    @property
    def keys(self) -> list[str]:
        return self._read(TaskData._keys_now)

    def _keys_now(self) -> list[str]:
        if self._keys is None:
            seen: dict[str, None] = {}
            for e in self.engines:
                for k in self._eng[e].keys:
                    seen.setdefault(k, None)
            self._keys = seen
        return list(self._keys)

    @property
    def data(self) -> list[dict]:
        """Latest value of every key, per engine (engine order), like ``AsyncResult.data``."""
        return self._read(lambda t: [t._eng[e].data() for e in t.engines])

    def data_at(self, step: int) -> list[dict | None]:
        """What each engine published at ``step`` (None where it did not publish that step)."""
        return self._read(lambda t: [t._eng[e].data_at(int(step)) for e in t.engines])

    def _key(self, key) -> tuple:
        if isinstance(key, tuple):
            return key
        if "/" not in key or (self._keys_now() and key in self._keys):
            return (key,)
        return tuple(key.split("/"))

    def __getitem__(self, key) -> list:
        """Per engine: the key's values with the step as first axis (a numpy array when every
        step has the same dtype and shape, else a list); engines without it give None."""
        return self._read(lambda t: t._series_values(key))

    def _series_values(self, key) -> list:
        k = self._key(key)
        out = []
        found = False
        for e in self.engines:
            try:
                out.append(self._eng[e].series(k)[1])
                found = True
            except KeyError:
                out.append(None)
        if not found:
            raise KeyError(f"no key {key!r} in task {self.task_id} (keys: "
                           f"{', '.join(self._keys_now()) or 'none'})")
        return out

    def steps(self, key=None) -> list[np.ndarray]:
        """Per engine: all publication steps, or the steps at which ``key`` was published."""
        return self._read(lambda t: t._steps_now(key))

    def _steps_now(self, key) -> list[np.ndarray]:
        if key is None:
            return [self._eng[e].steps for e in self.engines]
        k = self._key(key)
        out = []
        for e in self.engines:
            try:
                out.append(self._eng[e].series(k)[0])
            except KeyError:
                out.append(np.zeros(0, np.int64))
        return out

    @property
    def times(self) -> list[np.ndarray]:
        """Per engine: publish time (engine clock, unix seconds) of every publication."""
        return [self._eng[e].times for e in self.engines]


class Run:
    """A sink file. Its properties and indexing refer to the latest task (or the one chosen
    with ``open(path, task=T)``); ``run.task(T)`` gives any task."""

    def __init__(self, path, task: int | None = None, retry_s: float = 5.0):
        self.path = os.fspath(path)
        self._task = task
        self._retry_s = retry_s
        self._f = None
        self._format = L.FORMAT
        self._tasks: dict[int, TaskData] = {}
        self._in_read = False  # inside _reading: an inner read leaves the retry to the outer
        self.refresh()

    # -- file -----------------------------------------------------------------------------------
    def _open_file(self):
        p = self.path
        if not os.path.exists(p):
            raise SinkFileError(f"{p}: no such file")
        if os.path.isdir(p):
            raise SinkFileError(f"{p}: is a directory, not an HDF5 file")
        sb = superblock(p) if h5py.is_hdf5(p) else None
        if sb is None:
            raise SinkFileError(f"{p}: not an HDF5 file")
        if sb.missing:
            raise _Truncated(sb)
        if sb.writer:  # being written, or its writer died: SWMR read, bounded retries
            f = open_swmr(p)
        else:  # closed: a plain open, which checks the file itself
            f = h5py.File(p, "r", locking=False)
        try:
            fmt = f.attrs.get("mpipub_format")
        except BaseException:
            f.close()
            raise
        if fmt is None:
            f.close()
            raise SinkFileError(f"{p}: an HDF5 file, but not an mpipub sink file")
        if int(fmt) not in L.READ_FORMATS:
            f.close()
            raise SinkFileError(f"{p}: mpipub sink format {int(fmt)}, which this mpipub does "
                                f"not read (it reads formats "
                                f"{', '.join(map(str, L.READ_FORMATS))}); upgrade mpipub")
        self._format = int(fmt)
        return f

    def _damaged(self, exc: Exception, waited: float) -> SinkFileError:
        """The one-line error for a file that could not be read (``waited``: seconds a
        writer's open flags made us retry)."""
        p = self.path
        if isinstance(exc, _Truncated):
            sb = exc.sb
            what = (f"{p}: truncated: {sb.missing} bytes ({100 * sb.missing / sb.eof:.1f}%) "
                    f"missing at the end (the file has {sb.size} bytes, HDF5 recorded "
                    f"{sb.eof}); not read, so that no missing data reads as zeros")
        else:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # no quotes
            what = str(exc) if isinstance(exc, SinkFileError) else \
                f"{p}: damaged: {' '.join(str(msg).split())}"
        if waited:
            what += (f" (its writer did not close it: retried {waited:.1f} s in case it was "
                     "being written)")
            sb = _superblock_or_none(p)
            if sb is not None and not sb.missing and not sb.flags & FLAG_SWMR_WRITE:
                what += ("; its writer had it open outside SWMR mode: if that writer is gone, "
                         f"`h5clear -s {p}` makes it readable")
        return SinkFileError(what)

    def refresh(self) -> Run:
        """Reopen the file and pick up tasks, keys and steps written since.

        A file that its writer has open may fail to read for a moment (the writer is creating
        groups or datasets): retried for ``retry_s`` seconds. A truncated or damaged file
        raises ``SinkFileError`` (at once if its writer closed it, after ``retry_s`` if not;
        a truncated one without opening it)."""
        t0 = time.monotonic()
        closed_failures = 0
        while True:
            old = self._f
            try:
                if old is not None:
                    old.close()
                    self._f = None
                f = self._open_file()
                try:
                    tasks = {}
                    for name in f:
                        if name.startswith("task_"):
                            t = TaskData(f, name, self._format)
                            t._run = self
                            tasks[t.task_id] = t
                except BaseException:
                    f.close()
                    raise
                self._f, self._tasks = f, tasks
                return self
            except (OSError, KeyError, RuntimeError, ValueError) as exc:
                if isinstance(exc, SinkFileError) and not isinstance(exc, _DamagedRead):
                    raise  # not a sink file: no retrying (a RuntimeError, like h5py's errors)
                waited = time.monotonic() - t0
                sb = _superblock_or_none(self.path)
                live = sb is None or sb.writer  # None: removed or replaced meanwhile
                # A live writer may be creating objects right now (outside SWMR mode): retry.
                # A file that looks closed is read once more: its writer may have closed it
                # since this attempt began (at the end, or for a moment while it creates
                # objects); failing twice while closed, it is damaged.
                if not live:
                    closed_failures += 1
                if closed_failures > 1 or waited > self._retry_s:
                    raise self._damaged(exc, waited if live else 0.0) from None
                time.sleep(0.05)

    def _reading(self, read):
        """``read()``, retried on a fresh open (``refresh()``) when HDF5 cannot read what it
        reads while the file's writer is live: the writer may be creating groups or datasets
        outside SWMR mode at that moment, and an SWMR reader then sees torn metadata. Not
        retried once the file is closed (read once more after a refresh, in case the writer
        closed it meanwhile), nor beyond ``retry_s``: then a ``SinkFileError`` names what
        could not be read."""
        if self._in_read:
            return read()
        self._in_read = True
        try:
            t0 = time.monotonic()
            closed_failures = 0
            while True:
                try:
                    return read()
                except _DamagedRead as exc:
                    waited = time.monotonic() - t0
                    sb = _superblock_or_none(self.path)
                    live = sb is None or sb.writer
                    if not live:
                        closed_failures += 1
                    if closed_failures > 1 or waited > self._retry_s:
                        raise self._damaged(exc, waited if live else 0.0) from None
                    time.sleep(0.05)
                    self.refresh()
        finally:
            self._in_read = False

    def close(self) -> None:
        """Close the file (also at the end of a ``with`` block)."""
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<mpipub.Run {self.path}: tasks {self.tasks}>"

    # -- contents -------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        """The file's attributes: ``mpipub_format``, ``created``, ``nranks``, ``hosts`` (by rank),
        ``closed`` (docs/sink.md, "Layout")."""
        a = self._reading(lambda: self._file_attrs(dict))
        if "hosts" in a:
            a["hosts"] = json.loads(a["hosts"])
        return a

    @property
    def closed_cleanly(self) -> bool:
        """True once the writer has closed the file (the job ended)."""
        return self._reading(lambda: self._file_attrs(lambda at: "closed" in at))

    def _file_attrs(self, read):
        """``read(the file's attributes)``, HDF5's failure as a ``_DamagedRead``."""
        try:
            return read(self._f.attrs)
        except (OSError, KeyError) as exc:
            raise _DamagedRead(f"{self.path}: damaged: cannot read the file's attributes: "
                               f"{' '.join(str(exc).split())}") from None

    @property
    def tasks(self) -> list[int]:
        """The ids of the tasks in the file, in order."""
        return sorted(self._tasks)

    def task(self, task_id: int | None = None) -> TaskData:
        """One task's data (default: the task chosen at ``open``, else the latest); a
        ``KeyError`` names the tasks there are."""
        if task_id is None:
            task_id = self._task
        if task_id is None:
            if not self._tasks:
                raise KeyError(f"{self.path}: no tasks in the file (yet)")
            return self._tasks[max(self._tasks)]
        try:
            return self._tasks[int(task_id)]
        except KeyError:
            raise KeyError(f"no task {task_id} in {self.path} (tasks: "
                           f"{', '.join(map(str, self.tasks)) or 'none'})") from None

    @property
    def engines(self) -> list[int]:
        """The engines (MPI ranks) of the task."""
        return self.task().engines

    @property
    def keys(self) -> list[str]:
        """Every key any engine of the task published."""
        return self.task().keys

    @property
    def data(self) -> list[dict]:
        """Latest value of every key per engine, merged like ``AsyncResult.data``."""
        return self.task().data

    def data_at(self, step: int) -> list[dict | None]:
        """What each engine published at ``step`` (None where it did not)."""
        return self.task().data_at(step)

    def __getitem__(self, key) -> list:
        return self.task()[key]

    def steps(self, key=None) -> list[np.ndarray]:
        """Per engine, the steps stored (of ``key``, or of any key)."""
        return self.task().steps(key)

    @property
    def times(self) -> list[np.ndarray]:
        """Per engine, each stored step's publish time (engine clock, seconds since the
        epoch)."""
        return self.task().times


def open(path, task: int | None = None) -> Run:  # noqa: A001 - mpipub.open, like h5py.File
    """Open a sink file (finished or being written). ``task``: the task that ``run.data``,
    ``run[key]`` etc. refer to (default: the latest)."""
    return Run(path, task)
