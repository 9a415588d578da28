"""The HDF5 sink: every publication of every task, kept in one file that stays readable while
the job runs (HDF5 SWMR) and after it is killed.

Rank 0's I/O thread hands each publication to ``Sink.on_data``, which puts it on a queue
bounded in bytes and items; a writer thread appends it. When the disk is slower than the
engines, the queue fills, ``on_data`` blocks, the I/O thread stops receiving, the engines'
bounded outboxes fill and ``publish_data`` waits: memory stays bounded and every step lands.

The writer batches what is queued: datasets are resized once per batch and small rows are
written in one call. The file is in SWMR mode while appending; HDF5 does not support creating
objects in that mode, so when a batch needs new groups or datasets (a new task, a key first
seen, a changed shape or dtype) the writer flushes, reopens the file normally, creates them,
and turns SWMR on again. Readers (``mpipub.open``) reopen the file on ``refresh()``, so they see
new objects; plain h5py readers see new steps with ``Dataset.refresh()``.

The layout is described in ``mpipub.layout`` and docs/sink.md.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import sys
import threading
import time

import h5py
import numpy as np

from . import layout as L
from .errors import MpipubError


class SinkError(MpipubError):
    """The sink file cannot be created or written."""


_END = object()

_FILE_KW = dict(libver="latest", locking=False, rdcc_nbytes=4 << 20)


def _compression_kwargs(compression, compression_opts, shuffle) -> dict:
    if compression is None:
        return {}
    if compression in ("gzip", "lzf"):
        kw = {"compression": compression}
        if compression_opts is not None:
            kw["compression_opts"] = compression_opts
        if shuffle:
            kw["shuffle"] = True
        return kw
    try:
        import hdf5plugin
    except ImportError:
        raise SinkError(f"compression {compression!r} needs the hdf5plugin package "
                        "(pip install hdf5plugin); built in: 'gzip', 'lzf'") from None
    names = {"blosc": "Blosc", "blosc2": "Blosc2", "zstd": "Zstd", "lz4": "LZ4",
             "bitshuffle": "Bitshuffle", "bzip2": "BZip2"}
    cls = getattr(hdf5plugin, names.get(str(compression).lower(), ""), None)
    if cls is None:
        raise SinkError(f"unknown compression {compression!r}: use 'gzip', 'lzf' or one of "
                        f"{sorted(names)} (with hdf5plugin)")
    filt = cls(**(compression_opts or {}))
    kw = dict(filt)
    if shuffle:
        kw["shuffle"] = True
    return kw


def _check_path(path: str, overwrite: bool) -> None:
    d = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(d):
        raise SinkError(f"cannot create sink file {path}: directory {d} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise SinkError(f"cannot create sink file {path}: directory {d} is not writable")
    if os.path.isdir(path):
        raise SinkError(f"cannot create sink file {path}: it is a directory")
    if os.path.exists(path) and not overwrite:
        raise SinkError(f"sink file {path} already exists; remove it, choose another name or "
                        "pass overwrite=True (mpipub run --sink-overwrite)")


class _Series:
    __slots__ = ("data_path", "steps_path", "sig", "version", "n")

    def __init__(self, data_path, steps_path, sig, version):
        self.data_path, self.steps_path = data_path, steps_path
        self.sig, self.version = sig, version
        self.n = 0


class Sink:
    """Writes every publication to an HDF5 file (see module docs). Options:

    ``overwrite`` replace an existing file (default: refuse); ``flush_interval`` seconds
    between flushes (also flushed at the end of each task); ``compression`` 'gzip', 'lzf', or
    with hdf5plugin 'zstd', 'lz4', 'blosc', 'blosc2', 'bitshuffle', 'bzip2';
    ``compression_opts``; ``shuffle``; ``include``/``exclude``: fnmatch patterns of top-level
    keys to keep/skip; ``max_queue_bytes``/``max_queue_items``: the writer's queue bound
    (back-pressure beyond it).
    """

    def __init__(self, path, world=None, *, overwrite: bool = False, flush_interval: float = 1.0,
                 compression=None, compression_opts=None, shuffle: bool = False,
                 include=None, exclude=None, max_queue_bytes: int = 256 << 20,
                 max_queue_items: int = 100_000, _delay_s: float = 0.0):
        self.path = os.fspath(path)
        if not flush_interval or flush_interval <= 0:
            raise SinkError(f"flush_interval must be > 0 seconds, got {flush_interval!r}")
        self.flush_interval = float(flush_interval)
        self.include = None if include is None else tuple([include] if isinstance(include, str)
                                                          else include)
        self.exclude = None if exclude is None else tuple([exclude] if isinstance(exclude, str)
                                                          else exclude)
        self.comp = _compression_kwargs(compression, compression_opts, shuffle)
        self.max_queue_bytes = int(max_queue_bytes)
        self.max_queue_items = int(max_queue_items)
        self._delay_s = float(_delay_s)
        _check_path(self.path, overwrite)
        try:
            self.f = h5py.File(self.path, "w" if overwrite else "w-", **_FILE_KW)
        except (OSError, ValueError) as exc:
            raise SinkError(f"cannot create sink file {self.path}: {exc}") from None
        a = self.f.attrs
        a["mpipub_format"] = L.FORMAT
        a["created"] = time.time()
        if world is not None:
            a["nranks"] = world.size
            a["hosts"] = json.dumps(list(world.hosts))
        self.f.swmr_mode = True
        self.runtime = None  # set by the client: used to abort tasks when writing fails
        self.error: SinkError | None = None
        self.peak_queue_bytes = 0
        self.peak_queue_items = 0
        self.written = 0
        self._q: collections.deque = collections.deque()
        self._qbytes = 0
        self._cv = threading.Condition()
        self._closed = False
        self._series: dict = {}
        self._engines: dict = {}  # (task, engine) -> [group path, n]
        self._tasks: dict = {}  # task -> group path
        self._ds: dict = {}  # path -> open Dataset (cleared on reopen)
        self._where = ""
        self._thread = threading.Thread(target=self._run, name="mpipub-sink", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<mpipub.Sink {self.path}>"

    # -- hooks called by the client -------------------------------------------------------------
    def task_options(self) -> dict:
        if self.error is not None:
            raise SinkError(f"{self.error} (no new tasks while the sink is broken)")
        return {"check_value": functools.partial(L.check_selected, self.include, self.exclude)}

    def on_task_start(self, rec, payload) -> None:
        fn, args, kwargs = payload
        info = {
            "task_id": rec.task_id, "label": rec.label,
            "function": getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(fn)),
            "module": str(getattr(fn, "__module__", "")),
            "args": _short_repr(args), "kwargs": _short_repr(kwargs),
            "start": rec.submitted, "engines": list(rec.engines),
            "hosts": [rec.hosts[e] for e in rec.engines],
        }
        self._put(("start", info), 0)

    def on_data(self, rec, m, data) -> None:
        if self.include is not None or self.exclude is not None:
            data = {k: v for k, v in data.items()
                    if L.key_selected(k, self.include, self.exclude)}
        self._put(("data", rec.task_id, m.source, m.step, m.time, time.time(), data), m.nbytes)

    def on_task_end(self, rec) -> None:
        self._put(("end", rec.task_id, rec.finished or time.time()), 0)

    def close(self) -> None:
        """Write what is queued, flush and close the file."""
        if self._closed:
            return
        with self._cv:
            self._q.append((_END, 0))
            self._cv.notify_all()
        self._thread.join()
        self._closed = True
        if self.error is not None:
            raise self.error

    # -- queue ----------------------------------------------------------------------------------
    def _put(self, item, nbytes: int) -> None:
        cv = self._cv
        with cv:
            while (self._q and self.error is None and self._thread.is_alive()
                   and (self._qbytes + nbytes > self.max_queue_bytes
                        or len(self._q) >= self.max_queue_items)):
                cv.wait(0.1)  # back-pressure: the I/O thread stops receiving
            if self.error is not None or not self._thread.is_alive():
                return  # writing failed (reported): drop, never block forever
            self._q.append((item, nbytes))
            self._qbytes += nbytes
            if self._qbytes > self.peak_queue_bytes:
                self.peak_queue_bytes = self._qbytes
            if len(self._q) > self.peak_queue_items:
                self.peak_queue_items = len(self._q)
            cv.notify_all()

    def _take(self, timeout: float) -> list:
        with self._cv:
            if not self._q:
                self._cv.wait(timeout)
            batch = []
            size = 0
            while self._q and size < (64 << 20) and len(batch) < 20000:
                item, n = self._q.popleft()
                self._qbytes -= n
                size += n
                batch.append(item)
                if item is _END:
                    break
            self._cv.notify_all()
            return batch

    # -- the writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        last_flush = time.monotonic()
        dirty = False
        try:
            while True:
                wait = max(0.0, last_flush + self.flush_interval - time.monotonic()) if dirty \
                    else 0.5
                batch = self._take(wait)
                end = bool(batch) and batch[-1] is _END
                if end:
                    batch.pop()
                if batch:
                    if self._write(batch):
                        self._flush()
                        last_flush = time.monotonic()
                        dirty = False
                    else:
                        dirty = True
                if dirty and time.monotonic() - last_flush >= self.flush_interval:
                    self._flush()
                    last_flush = time.monotonic()
                    dirty = False
                if end:
                    break
            self.f.attrs["closed"] = time.time()
            self._flush()
            self.f.close()
        except BaseException as exc:  # noqa: BLE001 - report with file and step, keep the file
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        self.error = SinkError(f"writing sink file {self.path} failed{self._where}: "
                               f"{type(exc).__name__}: {exc}")
        sys.stderr.write(f"mpipub: {self.error}; later publications are not stored, data "
                         "flushed before stays readable\n")
        sys.stderr.flush()
        with self._cv:
            dropped = len(self._q)
            self._q.clear()
            self._qbytes = 0
            self._cv.notify_all()
        if dropped:
            sys.stderr.write(f"mpipub: {dropped} queued publications were not written\n")
        # Leave the file as it is: what was flushed is readable (like after a crash), and
        # HDF5 (2.0, h5py 3.16) segfaults when it closes or tears down a file whose writes
        # failed. So the handles are kept, never closed, and the client ends rank 0 without
        # HDF5's teardown (client._close_at_exit).
        self.broken_handles = (self.f, self._ds)
        rt = self.runtime
        if rt is not None:  # tell the engines: their running tasks stop at the next publish
            try:
                for rec in list(rt.records.values()):
                    busy = [e for e in rec.engines if not rec.state[e].done]
                    if busy:
                        rt.abort(rec.task_id, busy, f"because {self.error}")
            except Exception:  # noqa: BLE001
                pass

    def _flush(self) -> None:
        self.f.flush()

    def _ds_get(self, path: str):
        ds = self._ds.get(path)
        if ds is None:
            ds = self._ds[path] = self.f[path]
        return ds

    def _write(self, batch: list) -> bool:
        """Append a batch; return True if a task ended in it (flush now)."""
        creates: list = []  # (kind, args)
        rows: dict = collections.defaultdict(list)  # data_path -> [(series, step, value)]
        eng_rows: dict = collections.defaultdict(list)  # (task, engine) -> [(step, t, recv)]
        ends: list = []
        names = self._names_in_use
        for item in batch:
            kind = item[0]
            if kind == "data":
                _, task, eng, step, t_pub, t_recv, data = item
                ekey = (task, eng)
                if ekey not in self._engines:
                    self._new_engine(task, eng, creates)
                eng_rows[ekey].append((step, t_pub, t_recv))
                for path, value in L.flatten(data):
                    sig = L.leaf_signature(value)
                    versions = self._series.get((task, eng, path))
                    s = None if versions is None else versions.get(_sigkey(sig))
                    if s is None:  # first value, or a new dtype/shape/kind: a new dataset
                        s = self._new_series(task, eng, path, sig, creates, names)
                    rows[s.data_path].append((s, step, value))
            elif kind == "start":
                self._new_task(item[1], creates)
            elif kind == "end":
                ends.append(item)
        if creates:
            self._restructure(creates)
        for dpath, lst in rows.items():
            s = lst[0][0]
            self._where = f" (task {dpath.split('/')[1]}, {dpath.split('/')[2]}, " \
                          f"step {lst[0][1]})"
            self._append(s, lst)
        for (task, eng), lst in eng_rows.items():
            g, n = self._engines[(task, eng)]
            k = len(lst)
            arr = np.array(lst, dtype=np.float64)
            for name, col, dt in (("step", 0, np.int64), ("time", 1, np.float64),
                                  ("received", 2, np.float64)):
                ds = self._ds_get(f"{g}/{name}")
                ds.resize((n + k,))
                ds[n:n + k] = arr[:, col].astype(dt)
            self._engines[(task, eng)][1] = n + k
            self.written += k
        self._where = ""
        for _, task, t_end in ends:
            g = self._tasks.get(task)
            if g is not None:
                self.f[g].attrs["end"] = t_end
        if self._delay_s:
            time.sleep(self._delay_s * sum(len(v) for v in eng_rows.values()))
        return bool(ends)

    # -- structure ------------------------------------------------------------------------------
    @property
    def _names_in_use(self) -> dict:
        if not hasattr(self, "_names"):
            self._names: dict = collections.defaultdict(set)  # parent path -> child names
        return self._names

    def _new_task(self, info: dict, creates: list) -> None:
        g = "/" + L.TASK_FMT.format(info["task_id"])
        self._tasks[info["task_id"]] = g
        creates.append(("task", g, info))
        for e, h in zip(info["engines"], info["hosts"]):
            eg = f"{g}/{L.ENGINE_FMT.format(e)}"
            self._engines[(info["task_id"], e)] = [eg, 0]
            creates.append(("engine", eg, e, h))

    def _new_engine(self, task: int, eng: int, creates: list) -> None:
        # data for a task whose start we did not see (should not happen): make its groups
        if task not in self._tasks:
            self._new_task({"task_id": task, "label": "", "function": "", "module": "",
                            "args": "", "kwargs": "", "start": float("nan"), "engines": [],
                            "hosts": []}, creates)
        eg = f"{self._tasks[task]}/{L.ENGINE_FMT.format(eng)}"
        self._engines[(task, eng)] = [eg, 0]
        creates.append(("engine", eg, eng, ""))

    def _new_series(self, task, eng, path, sig, creates, names) -> _Series:
        eg = self._engines[(task, eng)][0]
        parent = ""
        for k in path[:-1]:  # dict groups on the way
            base = L.escape(k)
            cand, v = base, 0
            # a group may share its name with a group; not with a dataset
            while cand in names[(eg, parent, "ds")]:
                v += 1
                cand = f"{base}@{v}"
            names[(eg, parent, "grp")].add(cand)
            parent = f"{parent}/{cand}"
        base = L.escape(path[-1])
        versions = self._series.setdefault((task, eng, path), {})
        version = len(versions)
        cand = base if version == 0 else f"{base}@{version}"
        while cand in names[(eg, parent, "ds")] or cand in names[(eg, parent, "grp")]:
            version += 1
            cand = f"{base}@{version}"
        names[(eg, parent, "ds")].add(cand)
        s = _Series(f"{eg}/data{parent}/{cand}", f"{eg}/steps{parent}/{cand}", _sigkey(sig),
                    version)
        versions[s.sig] = s
        creates.append(("series", s, sig, path[-1]))
        return s

    def _restructure(self, creates: list) -> None:
        """Leave SWMR mode, create groups and datasets, enter SWMR mode again."""
        self.f.flush()
        self.f.close()
        self._ds.clear()
        self.f = f = h5py.File(self.path, "r+", **_FILE_KW)
        for c in creates:
            if c[0] == "task":
                _, g, info = c
                grp = f.require_group(g)
                for k in ("task_id", "label", "function", "module", "args", "kwargs", "start"):
                    grp.attrs[k] = info[k]
                grp.attrs["end"] = float("nan")
                grp.attrs["engines"] = np.asarray(info["engines"], dtype=np.int64)
            elif c[0] == "engine":
                _, eg, e, h = c
                grp = f.require_group(eg)
                grp.attrs["rank"] = e
                grp.attrs["host"] = h
                for name, dt in (("step", np.int64), ("time", np.float64),
                                 ("received", np.float64)):
                    if name not in grp:
                        grp.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt,
                                           chunks=(8192,))
                for name in ("data", "steps"):
                    if name not in grp:
                        grp.create_group(name, track_order=True)  # keys in publish order
            else:
                _, s, sig, key = c
                kind, dtype, shape = sig
                if kind == "str":
                    h5dt = h5py.string_dtype("utf-8")
                    itemsize = 16
                elif kind == "bytes":
                    h5dt = h5py.vlen_dtype(np.uint8)
                    itemsize = 16
                else:
                    h5dt = dtype
                    itemsize = dtype.itemsize
                comp = self.comp if kind == "array" and itemsize and \
                    int(np.prod(shape, dtype=np.int64)) > 1 else {}
                maxshape = (None, *[d if d > 0 else None for d in shape])
                ds = f.create_dataset(s.data_path, shape=(0, *shape), maxshape=maxshape,
                                      dtype=h5dt, chunks=L.chunk_rows(shape, itemsize), **comp)
                ds.attrs["key"] = key
                ds.attrs["kind"] = kind
                ds.attrs["version"] = s.version
                f.create_dataset(s.steps_path, shape=(0,), maxshape=(None,), dtype=np.int64,
                                 chunks=(8192,))
        f.flush()
        f.swmr_mode = True

    # -- appending ------------------------------------------------------------------------------
    def _append(self, s: _Series, lst: list) -> None:
        ds = self._ds_get(s.data_path)
        idx = self._ds_get(s.steps_path)
        n, k = s.n, len(lst)
        kind = s.sig[0]
        ds.resize(n + k, axis=0)
        if kind == "array":
            v0 = lst[0][2]
            if v0.nbytes >= (256 << 10) or k == 1:
                for i, (_, _, v) in enumerate(lst):
                    ds[n + i] = v
            else:
                ds[n:n + k] = np.stack([v for _, _, v in lst])
        elif kind == "str":
            ds[n:n + k] = np.array([v.encode("utf-8") for _, _, v in lst], dtype=object)
        elif kind == "bytes":
            for i, (_, _, v) in enumerate(lst):
                ds[n + i] = np.frombuffer(v, dtype=np.uint8)
        else:
            ds[n:n + k] = np.array([v for _, _, v in lst], dtype=ds.dtype)
        idx.resize((n + k,))
        idx[n:n + k] = np.array([st for _, st, _ in lst], dtype=np.int64)
        s.n = n + k


def _sigkey(sig):
    kind, dtype, shape = sig
    return (kind, None if dtype is None else dtype.str, shape)


def _short_repr(obj, limit: int = 4096) -> str:
    try:
        r = repr(obj)
    except Exception as exc:  # noqa: BLE001
        r = f"<repr failed: {exc!r}>"
    return r if len(r) <= limit else r[:limit] + "...(truncated)"
