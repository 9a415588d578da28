"""The HDF5 sink: every publication of every task, kept in one file that stays readable while
the job runs (HDF5 SWMR) and after it is killed.

Rank 0's I/O thread hands each publication to ``Sink.on_publications``, which queues it,
bounded in bytes and items; a writer thread appends it. When the disk is slower than the
engines, the queue fills, ``on_publications`` blocks, the I/O thread stops receiving, the engines'
bounded outboxes fill and ``publish_data`` waits: memory stays bounded and every step lands.

The writer batches what is queued: it waits until ``BATCH_BYTES`` are queued or the oldest
item waited ``BATCH_WAIT_S`` (at once at a task's end, at close and under back-pressure), so
each dataset is resized once per batch and its rows go to HDF5 in few calls through h5py's
low-level API. Array rows that fill whole chunks (uncompressed, see ``layout.chunk_rows``) are
written with ``H5Dwrite_chunk`` (one call per chunk, no chunk cache, no copy for one-row
chunks); the rest go through the chunk cache.

The file is in SWMR mode while appending; HDF5 does not support creating objects in that
mode, so when a batch needs new groups or datasets (a new task, a key first seen, a changed
shape or dtype) the writer flushes, reopens the file normally, creates them, and turns SWMR on
again. Readers (``mpipub.open``) reopen the file on ``refresh()``, so they see
new objects; plain h5py readers see new steps with ``Dataset.refresh()``.

The layout is described in ``mpipub.sink.layout`` and docs/sink.md.
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
from h5py import h5d, h5s

from ..errors import SinkError
from . import layout as L

_END = object()

#: file format of HDF5 1.10, the oldest with SWMR: "latest" would write the format of the
#: HDF5 that h5py ships (2.0), which the h5dump, netCDF and h5py builds of most systems (1.10
#: to 1.14) cannot open
_FILE_KW = dict(libver=("v110", "v110"), locking=False, rdcc_nbytes=4 << 20)

#: Default bound of the writer's queue. The page cache, not this queue, absorbs the disk's
#: pace; the queue only lets the I/O thread run ahead of the writer. Every queued byte is a
#: received buffer held on rank 0, so a deep queue costs memory and cache, and measured
#: slower (docs/benchmarks.md, "Why the constants are what they are").
MAX_QUEUE_BYTES = 64 << 20

#: the writer takes a batch when this much is queued, or when the oldest item waited
#: BATCH_WAIT_S: fewer, larger appends (each costs a few h5py calls per dataset), and the
#: I/O thread receives undisturbed (no GIL hand-offs) while the writer waits
BATCH_BYTES = 8 << 20
BATCH_ITEMS = 4096
BATCH_WAIT_S = 0.02
#: a new task's first batch waits (up to START_WAIT_S) for every engine's first publication:
#: creating groups and datasets means reopening the file, best done once for all of them
START_WAIT_S = 0.2
#: array dtype kinds written as raw chunks (their bytes are the file's bytes)
_DIRECT_KINDS = frozenset("biufc")
#: series whose datasets the writer keeps open between batches, at most (the least recently
#: written are closed beyond it and reopened when written again). HDF5 2.0 in SWMR mode fails
#: writes ("Child entry doesn't have a flush dependency parent array") with ~3000 datasets open.
MAX_OPEN_SERIES = 1024
#: a batch that creates groups or datasets takes at most this much of each engine's
#: publications before it is flushed (the rest follows at once; see Sink._write)
HEAD_BYTES = 1 << 20
#: rows written when their dataset is created: at most this much a series, and in all
INIT_SERIES_BYTES = 64 << 10
INIT_BYTES = 4 << 20
_STR_DT = h5py.string_dtype("utf-8")


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
    """One leaf dataset. Dense (``first`` >= 0): row i is the engine's publication
    ``first + i``, so it needs no steps dataset; sparse (``first`` == -1): ``steps/<name>``
    holds the step of each row. A dense series never takes a row out of turn: a key that
    skips a publication continues in a new, sparse series (see ``Sink._write``)."""

    __slots__ = ("data_path", "steps_path", "name", "sig", "version", "n", "rows", "first",
                 "kind", "dtype", "shape", "chunk_rows", "ids", "gen", "used", "init")

    def __init__(self, data_path, steps_path, name, sig, version, first):
        self.data_path, self.steps_path, self.name = data_path, steps_path, name
        self.sig, self.version, self.first = sig, version, first
        self.n = 0  # rows written
        self.rows = 0  # rows taken (written, or planned in the batch being written)
        self.init = None  # rows written when the datasets are created (see Sink._write)
        self.kind, dtype, self.shape = sig
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.chunk_rows = 0  # > 0: rows of whole chunks may be written raw (set on creation)
        self.ids = None  # (data, steps or None) low-level ids, valid while gen == Sink._gen
        self.gen = -1
        self.used = 0  # the writer's batch count when it was last written


class _Engine:
    __slots__ = ("group", "n", "ids", "gen", "nindex")

    def __init__(self, group):
        self.group, self.n, self.ids, self.gen = group, 0, None, -1
        self.nindex = 0  # rows of its index dataset


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
                 include=None, exclude=None, max_queue_bytes: int = MAX_QUEUE_BYTES,
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
        #: set by the client: called by the I/O thread while back-pressure blocks it in _put,
        #: so that the client's messages to engines (aborts, stops) never wait for the disk
        self.while_blocked = None
        self.error: SinkError | None = None
        self.peak_queue_bytes = 0
        self.peak_queue_items = 0
        self.written = 0
        self._q: collections.deque = collections.deque()
        self._qbytes = 0
        self._q_since = 0.0  # when the oldest queued item was put
        self._urgent = False  # take what is queued now (task end, close, back-pressure)
        self._starting: dict = {}  # new task -> [engines yet to publish, deadline]
        self._cv = threading.Condition()
        self._closed = False
        self._series: dict = {}  # (task, engine, path) -> {signature: _Series}
        self._nver: dict = {}  # (task, engine, path) -> datasets made for it so far
        self._deferred: set = set()  # (task, engine) whose rest waits (see _write)
        # (engine group, parent, 'ds'|'grp') -> child names taken there
        self._names: dict = collections.defaultdict(set)
        self._engines: dict = {}  # (task, engine) -> _Engine
        self._engine_by_group: dict = {}  # engine group path -> _Engine
        self._tasks: dict = {}  # task -> group path
        # series with open dataset ids, least recently written first
        self._open: collections.OrderedDict = collections.OrderedDict()
        self._gids: dict = {}  # group path -> GroupID (cleared on reopen)
        self._templates: dict = {}  # dataset signature -> (type, creation plist) (see _create)
        self._plans: dict = {}  # series signature -> _plan()
        self._spaces: dict = {}  # row shape -> dataspace of a new (empty) dataset
        self._where = ""
        self._last = ""  # the last rows written, named in a flush error
        self._gen = 0  # bumped when the file is reopened (low-level ids change)
        self._batches = 0  # batches written (see _keep_open)
        self._restructuring = False  # the file is open outside SWMR mode (see _restructure)
        global _write_chunk
        if _write_chunk is _write_chunk_h5py:
            _write_chunk = _gil_free_chunk_writer() or _write_chunk_h5py
        self._thread = threading.Thread(target=self._run, name="mpipub-sink", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<mpipub.Sink {self.path}>"

    # -- hooks called by the client -------------------------------------------------------------
    def task_options(self) -> dict:
        if self.error is not None:
            raise SinkError(f"{self.error} (no new tasks while the sink is broken)")
        # (while check_value is set, the engine's C path takes only what sink/rules.py's table
        # surely accepts; check_value decides the rest)
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

    def on_publications(self, rec, engine: int, pubs: list) -> None:
        """One received batch of ``engine``: ``[(step, publish time, dict, nbytes), ...]``."""
        now = time.time()
        selective = self.include is not None or self.exclude is not None
        for step, t, data, nbytes in pubs:
            if selective:
                data = {k: v for k, v in data.items()
                        if L.key_selected(k, self.include, self.exclude)}
            self._put(("data", rec.task_id, engine, step, t, now, data), nbytes)

    def on_task_end(self, rec) -> None:
        self._put(("end", rec.task_id, rec.finished or time.time()), 0)

    def on_task_cut_short(self, rec, why: str) -> None:
        """The job is ending while ``rec`` runs: its group gets ``cut_short = why``."""
        self._put(("cut", rec.task_id, why), 0)

    def queued_bytes(self) -> int:
        return self._qbytes

    def close(self) -> None:
        """Write what is queued, flush and close the file."""
        if self._closed:
            return
        with self._cv:
            if not self._q:
                self._q_since = time.monotonic()
            self._q.append((_END, 0))
            self._urgent = True
            self._cv.notify_all()
        self._thread.join()
        self._closed = True
        if self.error is not None:
            raise self.error

    # -- queue ----------------------------------------------------------------------------------
    def _put(self, item, nbytes: int) -> None:
        cv = self._cv
        with cv:
            q = self._q
            while (q and self.error is None and self._thread.is_alive()
                   and (self._qbytes + nbytes > self.max_queue_bytes
                        or len(q) >= self.max_queue_items)):
                if not self._urgent:  # back-pressure: the writer takes what is queued now
                    self._urgent = True
                    cv.notify_all()
                cv.wait(0.005)  # back-pressure: the I/O thread stops receiving...
                if self.while_blocked is not None:  # ...but still sends (aborts, stops)
                    cv.release()
                    try:
                        self.while_blocked()
                    finally:
                        cv.acquire()
            if self.error is not None or not self._thread.is_alive():
                return  # writing failed (reported): drop, never block forever
            wake = not q
            if wake:
                self._q_since = time.monotonic()
            kind = item[0]
            if kind == "data":
                st = self._starting.get(item[1])
                if st is not None:
                    st[0].discard(item[2])
                    if not st[0]:  # every engine of a new task published: go
                        del self._starting[item[1]]
                        wake = True
            elif kind == "start" and item[1]["engines"]:
                self._starting[item[1]["task_id"]] = [set(item[1]["engines"]),
                                                      time.monotonic() + START_WAIT_S]
            q.append((item, nbytes))
            self._qbytes += nbytes
            if self._qbytes > self.peak_queue_bytes:
                self.peak_queue_bytes = self._qbytes
            if len(q) > self.peak_queue_items:
                self.peak_queue_items = len(q)
            if kind == "end":
                self._urgent = wake = True
                self._starting.pop(item[1], None)
            elif self._qbytes >= BATCH_BYTES or len(q) >= BATCH_ITEMS:
                wake = True
            if wake:
                cv.notify_all()

    def _take(self, flush_at: float | None) -> list:
        """Wait for a batch (see BATCH_BYTES); return [] when a flush is due (``flush_at``,
        a time.monotonic() value or None) before anything is queued."""
        cv, q = self._cv, self._q
        with cv:
            while True:
                now = time.monotonic()
                if q:
                    due = self._q_since + BATCH_WAIT_S
                    batch_full = self._qbytes >= BATCH_BYTES or len(q) >= BATCH_ITEMS
                    if self._starting:  # wait for a new task's engines (see START_WAIT_S)
                        for t_id, (_, deadline) in list(self._starting.items()):
                            if deadline <= now:
                                del self._starting[t_id]
                        if self._starting:
                            due = max(due, min(d for _, d in self._starting.values()))
                            batch_full = len(q) >= BATCH_ITEMS
                    if flush_at is not None and flush_at < due:
                        due = flush_at
                    if self._urgent or now >= due or batch_full:
                        break
                else:
                    if flush_at is not None and now >= flush_at:
                        return []
                    due = flush_at if flush_at is not None else now + 0.5
                cv.wait(max(0.0, due - now))
            batch = []
            size = 0
            while q and size < (64 << 20) and len(batch) < 20000:
                item, n = q.popleft()
                self._qbytes -= n
                size += n
                batch.append(item)
                if item is _END:
                    break
            if q:
                self._q_since = time.monotonic() - BATCH_WAIT_S  # the rest: next, at once
            else:
                self._urgent = False
            cv.notify_all()
            return batch

    # -- the writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        last_flush = time.monotonic()
        dirty = False
        try:
            while True:
                batch = self._take(last_flush + self.flush_interval if dirty else None)
                end = bool(batch) and batch[-1] is _END
                if end:
                    batch.pop()
                while batch:  # a batch that creates objects may leave a rest (see _write)
                    flush_now, batch = self._write(batch)
                    if flush_now:
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
        hint = ""
        if self._restructuring:  # outside SWMR mode: the file keeps a writer's plain flags
            hint = (f"; it failed while creating datasets, outside SWMR mode: "
                    f"`h5clear -s {self.path}` makes what was flushed before readable")
        self.error = SinkError(f"writing sink file {self.path} failed{self._where}: "
                               f"{type(exc).__name__}: {exc}{hint}")
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
        self.broken_handles = (self.f, self._open, self._gids)
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
        self._where = f" (flushing; last written: {self._last})" if self._last else ""
        self.f.flush()
        self._where = ""

    def _gid(self, path: str):
        """Low-level id of the group at ``path`` (created with its parents if missing)."""
        g = self._gids.get(path)
        if g is None:
            f = self.f
            g = self._gids[path] = (f[path] if path in f else f.create_group(path)).id
        return g

    def _ids(self, s: _Series) -> tuple:
        """The (data, steps or None) dataset ids of ``s``, opened if needed; at most
        MAX_OPEN_SERIES series stay open."""
        op = self._open
        s.used = self._batches
        if s.gen == self._gen:
            op.move_to_end(s)
            return s.ids
        ids = []
        for path in (s.data_path, s.steps_path):
            if path is None:
                ids.append(None)
                continue
            parent, name = path.rsplit("/", 1)
            ids.append(h5d.open(self._gid(parent), name.encode()))
        self._keep_open(s, tuple(ids))
        return s.ids

    def _keep_open(self, s: _Series, ids: tuple) -> None:
        """Keep ``s`` open; beyond MAX_OPEN_SERIES close the least recently written series if
        no recent batch wrote it, else the most recently written one before ``s``: a batch
        that writes more series than that, in the same order every time, then finds most
        of them open (least-recently-used eviction would close each before its next use)."""
        op = self._open
        s.ids, s.gen, s.used = ids, self._gen, self._batches
        op[s] = None
        while len(op) > MAX_OPEN_SERIES:
            old = next(iter(op))
            if old.used >= self._batches - 1:  # in use: keep the oldest, close a recent one
                op.move_to_end(s, last=False)
                old = op.popitem(last=True)[0]
                op.move_to_end(s)
            else:
                del op[old]
            old.ids, old.gen = None, -1

    def _write(self, batch: list) -> tuple[bool, list]:
        """Append a batch; return (flush now?, the rest of the batch, written next).

        Flush now when a task ended in it, or when it created groups or datasets (a task's
        first data, a new key: on disk at once, not one flush interval later, so a job that
        dies or fills the disk early still leaves its first steps). A batch that creates
        objects takes at most HEAD_BYTES of each engine's publications; the rest waits for
        the next call, after the flush: a disk that fills with the later steps of a batch
        then cannot take an engine's first steps with it."""
        self._batches += 1
        creates: list = []  # (kind, args)
        rows: dict = collections.defaultdict(list)  # data_path -> [(series, step, value)]
        eng_rows: dict = collections.defaultdict(list)  # (task, engine) -> [(step, t, recv)]
        ends: list = []
        names = self._names
        taken: dict = collections.defaultdict(int)  # (task, engine) -> bytes in this batch
        rest: list = []
        for item in batch:
            kind = item[0]
            if rest and (kind != "data" or (item[1], item[2]) not in taken
                         or (item[1], item[2]) in self._deferred):
                rest.append(item)  # keeps its order after a deferred item
                continue
            if kind == "data":
                _, task, eng, step, t_pub, t_recv, data = item
                ekey = (task, eng)
                if creates and taken[ekey] >= HEAD_BYTES:
                    self._deferred.add(ekey)
                    rest.append(item)
                    continue
                if ekey not in self._engines:
                    self._new_engine(task, eng, creates)
                erows = eng_rows[ekey]
                pub = self._engines[ekey].n + len(erows)  # its publication index
                erows.append((step, t_pub, t_recv))
                nbytes = 0
                for path, value in L.flatten(data):
                    sig = L.leaf_signature(value)
                    skey = _sigkey(sig)
                    versions = self._series.get((task, eng, path))
                    s = None if versions is None else versions.get(skey)
                    if s is None:  # first value, or a new dtype/shape/kind: a new dense dataset
                        s = self._new_series(task, eng, path, sig, creates, names, pub)
                    elif s.first >= 0 and s.first + s.rows != pub:  # skipped publications:
                        s = self._new_series(task, eng, path, sig, creates, names, -1)
                    s.rows += 1
                    rows[s.data_path].append((s, step, value))
                    nbytes += value.nbytes if type(value) is np.ndarray else 8
                taken[ekey] += nbytes
            elif kind == "start":
                self._new_task(item[1], creates)
            elif kind == "end" or kind == "cut":
                ends.append(item)
        self._deferred.clear()
        if creates:
            self._plan_init(creates, rows)
            self._restructure(creates)
        for dpath, lst in rows.items():
            s = lst[0][0]
            if s.init is not None:  # written with its datasets
                s.init = None
                continue
            self._where = f" (task {dpath.split('/')[1]}, {dpath.split('/')[2]}, " \
                          f"step {lst[0][1]})"
            self._append(s, lst)
        for (task, eng), lst in eng_rows.items():
            e = self._engines[(task, eng)]
            if e.gen != self._gen:
                e.ids = tuple(self.f[f"{e.group}/{name}"].id
                              for name in ("step", "time", "received"))
                e.gen = self._gen
            n, k = e.n, len(lst)
            arr = np.array(lst, dtype=np.float64).T  # step, time, received
            _ll_append(e.ids[0], n, arr[0].astype(np.int64))
            _ll_append(e.ids[1], n, np.ascontiguousarray(arr[1]))
            _ll_append(e.ids[2], n, np.ascontiguousarray(arr[2]))
            e.n = n + k
            self.written += k
        if rows:
            self._last = self._where[2:-1] or self._last
        self._where = ""
        for kind, task, value in ends:
            g = self._tasks.get(task)
            if g is not None:
                self.f[g].attrs["end" if kind == "end" else "cut_short"] = value
        if self._delay_s:
            time.sleep(self._delay_s * sum(len(v) for v in eng_rows.values()))
        return bool(ends or creates), rest

    # -- structure ------------------------------------------------------------------------------
    def _new_task(self, info: dict, creates: list) -> None:
        g = "/" + L.TASK_FMT.format(info["task_id"])
        self._tasks[info["task_id"]] = g
        creates.append(("task", g, info))
        for e, h in zip(info["engines"], info["hosts"]):
            eg = f"{g}/{L.ENGINE_FMT.format(e)}"
            self._engines[(info["task_id"], e)] = self._engine_by_group[eg] = _Engine(eg)
            creates.append(("engine", eg, e, h))

    def _new_engine(self, task: int, eng: int, creates: list) -> None:
        # data for a task whose start we did not see (should not happen): make its groups
        if task not in self._tasks:
            self._new_task({"task_id": task, "label": "", "function": "", "module": "",
                            "args": "", "kwargs": "", "start": float("nan"), "engines": [],
                            "hosts": []}, creates)
        eg = f"{self._tasks[task]}/{L.ENGINE_FMT.format(eng)}"
        self._engines[(task, eng)] = self._engine_by_group[eg] = _Engine(eg)
        creates.append(("engine", eg, eng, ""))

    def _new_series(self, task, eng, path, sig, creates, names, first) -> _Series:
        """A new dataset for ``path``: dense from publication ``first``, or sparse (-1)."""
        eg = self._engines[(task, eng)].group
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
        version = self._nver.get((task, eng, path), 0)
        cand = base if version == 0 else f"{base}@{version}"
        while cand in names[(eg, parent, "ds")] or cand in names[(eg, parent, "grp")]:
            version += 1
            cand = f"{base}@{version}"
        self._nver[(task, eng, path)] = version + 1
        names[(eg, parent, "ds")].add(cand)
        name = f"{parent}/{cand}"[1:]
        s = _Series(f"{eg}/data/{name}", None if first >= 0 else f"{eg}/steps/{name}", name,
                    _sigkey(sig), version, first)
        versions[s.sig] = s  # (a dense series that skipped a publication is done)
        creates.append(("series", s, sig, eg))
        return s

    def _plan_init(self, creates: list, rows: dict) -> None:
        """Choose the new series whose rows in this batch are written when their datasets are
        created (numeric rows, at most INIT_SERIES_BYTES a series and INIT_BYTES in all):
        one call instead of reopening, extending and writing each dataset in SWMR mode,
        which was most of the cost of a publication with thousands of new keys."""
        budget = INIT_BYTES
        for c in creates:
            if c[0] != "series":
                continue
            s = c[1]
            if s.kind in ("str", "bytes"):
                continue
            lst = rows.get(s.data_path)
            if not lst:
                continue
            nb = len(lst) * (s.dtype.itemsize * int(np.prod(s.shape, dtype=np.int64)) or 1)
            if nb > INIT_SERIES_BYTES or nb > budget:
                continue
            budget -= nb
            s.init = lst

    def _restructure(self, creates: list) -> None:
        """Leave SWMR mode, create groups and datasets (with their first rows where
        ``_plan_init`` chose so: small, so that a full disk fails in SWMR mode, where a failed
        write leaves a file that SWMR readers open), enter SWMR mode again."""
        self.f.flush()
        for s in self._open:
            s.ids, s.gen = None, -1
        self._open.clear()
        self._gids.clear()
        self.f.close()
        self._gen += 1
        self.f = f = h5py.File(self.path, "r+", **_FILE_KW)
        self._restructuring = True
        index: dict = collections.defaultdict(list)  # engine group -> its new index rows
        for c in creates:
            if c[0] == "task":
                _, g, info = c
                grp = f.create_group(g)  # new: a task id is created once
                for k in ("task_id", "label", "function", "module", "args", "kwargs", "start"):
                    grp.attrs[k] = info[k]
                grp.attrs["end"] = float("nan")
                grp.attrs["engines"] = np.asarray(info["engines"], dtype=np.int64)
            elif c[0] == "engine":
                _, eg, e, h = c
                grp = f.create_group(eg)  # new: each (task, engine) is created once
                grp.attrs["rank"] = e
                grp.attrs["host"] = h
                for name, dt in (("step", np.int64), ("time", np.float64),
                                 ("received", np.float64)):
                    grp.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt,
                                       chunks=(8192,))
                grp.create_dataset("index", shape=(0,), maxshape=(None,), dtype=L.INDEX_DTYPE,
                                   chunks=(1024,))
                for name in ("data", "steps"):
                    grp.create_group(name, track_order=True)  # keys in publish order
            else:
                _, s, sig, eg = c
                self._create(s, sig)
                index[eg].append((s.name, s.kind.encode(), s.version, s.first))
        for eg, lst in index.items():
            e = self._engine_by_group[eg]
            ds = f[f"{eg}/index"]
            ds.resize((e.nindex + len(lst),))
            ds[e.nindex:] = np.array(lst, dtype=L.INDEX_DTYPE)
            e.nindex += len(lst)
        f.flush()
        f.swmr_mode = True
        self._restructuring = False

    def _create(self, s: _Series, sig: tuple) -> None:
        """Create the datasets of series ``s`` (with ``s.init``'s rows, else empty). The
        first dataset of each signature is made with h5py; the next ones reuse its type and
        creation property list through the low-level API: h5py's per-call work was most of
        the cost of a publication with thousands of new keys."""
        plan = self._plans.get(sig)
        if plan is None:
            plan = self._plans[sig] = self._plan(sig)
        chunk_rows, specs, direct = plan
        s.chunk_rows = chunk_rows
        init = s.init
        k = 0 if init is None else len(init)
        ids = []
        for path, (tkey, dt, shp, chk, kw), is_data in zip((s.data_path, s.steps_path), specs,
                                                          (True, False)):
            if path is None:
                ids.append(None)
                continue
            tmpl = self._templates.get(tkey)
            if tmpl is None:
                maxshape = (None, *[d if d > 0 else None for d in shp])
                dsid = self.f.create_dataset(path, shape=(0, *shp), maxshape=maxshape,
                                             dtype=dt, chunks=chk, **kw).id
                self._templates[tkey] = (dsid.get_type(), dsid.get_create_plist())
                if k:
                    dsid.set_extent((k, *shp))
            else:
                space = self._spaces.get((k, shp))
                if space is None:
                    maxshape = (h5s.UNLIMITED, *[d if d > 0 else h5s.UNLIMITED for d in shp])
                    space = self._spaces[(k, shp)] = h5s.create_simple((k, *shp), maxshape)
                parent, name = path.rsplit("/", 1)
                dsid = h5d.create(self._gid(parent), name.encode(), tmpl[0], space,
                                  dcpl=tmpl[1])
            if k:
                if not is_data:
                    arr = np.array([st for _, st, _ in init], dtype=np.int64)
                elif s.kind == "array":
                    arr = _rows([v for _, _, v in init])
                else:
                    arr = np.array([v for _, _, v in init], dtype=s.dtype)
                R = direct[is_data]
                if R:  # whole chunks, padded, past the chunk cache: a third faster
                    zeros = (0,) * (arr.ndim - 1)
                    for j in range(0, k, R):
                        piece = arr[j:j + R]
                        if len(piece) < R:
                            buf = np.zeros((R, *arr.shape[1:]), arr.dtype)
                            buf[:len(piece)] = piece
                            piece = buf
                        _write_chunk(dsid, (j, *zeros), piece)
                else:
                    dsid.write(h5s.ALL, h5s.ALL, arr)
            ids.append(dsid)
        s.n = k
        self._keep_open(s, tuple(ids))

    def _plan(self, sig: tuple) -> tuple:
        """How the datasets of a series of signature ``sig`` are made: (rows per raw chunk or
        0, [(template key, dtype, row shape, chunks, compression kwargs)] for data, steps)."""
        kind, dtype, shape = sig
        if kind == "str":
            h5dt, itemsize = _STR_DT, 16
        elif kind == "bytes":
            h5dt, itemsize = h5py.vlen_dtype(np.uint8), 16
        else:
            h5dt, itemsize = dtype, dtype.itemsize
        comp = self.comp if kind == "array" and itemsize and \
            int(np.prod(shape, dtype=np.int64)) > 1 else {}
        chunks = tuple(L.chunk_rows(shape, itemsize))
        raw = 0
        if (kind == "array" and not comp and dtype.kind in _DIRECT_KINDS
                and tuple(chunks[1:]) == tuple(shape) and 0 not in shape):
            raw = chunks[0]  # a chunk is whole rows: raw chunk writes
        dkey = (str(h5dt) if kind not in ("str", "bytes") else kind, shape, chunks, bool(comp))
        i8 = np.dtype(np.int64)
        skey = (str(i8), (), (L.MAX_CHUNK_ROWS,), False)
        # rows per chunk where a dataset's first rows can be written as whole raw chunks
        # (steps, data): uncompressed numbers, a chunk being whole rows
        direct = (L.MAX_CHUNK_ROWS,
                  chunks[0] if (not comp and kind not in ("str", "bytes")
                                and dtype.kind in _DIRECT_KINDS
                                and tuple(chunks[1:]) == tuple(shape) and 0 not in shape)
                  else 0)
        return raw, ((dkey, h5dt, shape, chunks, comp),
                     (skey, i8, (), (L.MAX_CHUNK_ROWS,), {})), direct

    # -- appending ------------------------------------------------------------------------------
    def _append(self, s: _Series, lst: list) -> None:
        kind = s.kind
        if kind == "str" or kind == "bytes":
            self._append_vlen(s, lst)
            return
        dsid, idxid = self._ids(s)
        n, k = s.n, len(lst)
        if kind == "array":
            vals = [v for _, _, v in lst]
            R = s.chunk_rows
            if R:
                dsid.set_extent((n + k, *s.shape))
                _write_chunked(dsid, n, vals, R, len(s.shape))
            else:
                _ll_append(dsid, n, _rows(vals))
        else:
            _ll_append(dsid, n, np.array([v for _, _, v in lst], dtype=s.dtype))
        if idxid is not None:
            _ll_append(idxid, n, np.array([st for _, st, _ in lst], dtype=np.int64))
        s.n = n + k

    def _append_vlen(self, s: _Series, lst: list) -> None:
        dsid, idxid = self._ids(s)
        ds = h5py.Dataset(dsid)
        n, k = s.n, len(lst)
        ds.resize(n + k, axis=0)
        if s.kind == "str":
            ds[n:n + k] = np.array([v.encode("utf-8") for _, _, v in lst], dtype=object)
        else:
            for i, (_, _, v) in enumerate(lst):
                ds[n + i] = np.frombuffer(v, dtype=np.uint8)
        if idxid is not None:
            _ll_append(idxid, n, np.array([st for _, st, _ in lst], dtype=np.int64))
        s.n = n + k


def _rows(vals: list) -> np.ndarray:
    """Rows (arrays of one shape and dtype) as one C-contiguous (k, *shape) array."""
    if len(vals) == 1:
        v = vals[0]
        return (v if v.flags.c_contiguous else np.ascontiguousarray(v)).reshape(1, *v.shape)
    return np.ascontiguousarray(np.stack(vals))  # (stacked F-ordered rows are not C-ordered)


def _ll_write(dsid, n: int, arr: np.ndarray) -> None:
    """Write ``arr`` (C-contiguous, (k, *row)) as rows n..n+k-1 (within the extent)."""
    if arr.size:
        shape = arr.shape
        fs = dsid.get_space()
        fs.select_hyperslab((n,) + (0,) * (len(shape) - 1), shape)
        dsid.write(h5s.create_simple(shape), fs, arr)


def _ll_append(dsid, n: int, arr: np.ndarray) -> None:
    """Extend a dataset of n rows by ``arr`` (C-contiguous, (k, *row)) and write it."""
    dsid.set_extent((n + arr.shape[0], *arr.shape[1:]))
    _ll_write(dsid, n, arr)


def _write_chunked(dsid, n: int, vals: list, R: int, ndim: int) -> None:
    """Write rows n.. (the extent already covers them) of a dataset whose chunks are R whole
    rows: chunks the rows fill entirely are written raw (H5Dwrite_chunk, past the chunk
    cache; a one-row chunk straight from the received buffer); the rows of a chunk begun
    before or left incomplete go through the chunk cache. A chunk is written one way only."""
    k = len(vals)
    i = min(k, -n % R)  # rows that complete a chunk begun by an earlier batch
    if i:
        _ll_write(dsid, n, _rows(vals[:i]))
    zeros = (0,) * ndim
    while k - i >= R:
        if R == 1:
            v = vals[i]
            buf = v if v.flags.c_contiguous else np.ascontiguousarray(v)
        else:
            buf = np.ascontiguousarray(np.stack(vals[i:i + R]))
        _write_chunk(dsid, (n + i, *zeros), buf)
        i += R
    if i < k:
        _ll_write(dsid, n + i, _rows(vals[i:]))


def _write_chunk_h5py(dsid, offset: tuple, buf: np.ndarray) -> None:
    dsid.write_direct_chunk(offset, buf)


def _gil_free_chunk_writer():
    """H5Dwrite_chunk called through ctypes, which releases the GIL while HDF5 copies the chunk
    to the file (h5py holds the GIL in every call): the client's I/O thread keeps receiving
    while the writer writes. h5py's lock (``phil``) is held, so no other thread is inside
    HDF5 meanwhile (threads waiting for it release the GIL). None where the HDF5 library that
    h5py loaded cannot be found (then h5py's write_direct_chunk is used)."""
    try:
        import ctypes

        from h5py._objects import phil

        from .h5file import libhdf5

        lib = libhdf5()
        if lib is None:
            return None
        fn = lib.H5Dwrite_chunk
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_uint32,
                       ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t, ctypes.c_void_p]
        offs_t = {}

        def write_chunk(dsid, offset: tuple, buf: np.ndarray) -> None:
            t = offs_t.get(len(offset))
            if t is None:
                t = offs_t[len(offset)] = ctypes.c_uint64 * len(offset)
            with phil:
                ok = fn(dsid.id, 0, 0, t(*offset), buf.nbytes, buf.ctypes.data) >= 0
            if not ok:  # again through h5py, for its error message (or success)
                dsid.write_direct_chunk(offset, buf)

        return write_chunk
    except Exception:  # noqa: BLE001 - any surprise: h5py's (GIL-holding) call
        return None


_write_chunk = _write_chunk_h5py


def _sigkey(sig):
    kind, dtype, shape = sig
    return (kind, None if dtype is None else dtype.str, shape)


def _short_repr(obj, limit: int = 4096) -> str:
    try:
        r = repr(obj)
    except Exception as exc:  # noqa: BLE001
        r = f"<repr failed: {exc!r}>"
    return r if len(r) <= limit else r[:limit] + "...(truncated)"
