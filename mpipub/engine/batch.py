"""The engine's open batch: ``publish_data``'s publications of one task, packed for one
message (the format: ``mpipub.transport.packing``).

``Batch.add`` is the Python path; where ``_fastpub`` is built, its ``BatchBase`` holds the
fields and the C path appends exactly what ``add`` would for plain publications. The
constants and fields both share are declared in ``contract.py``.
"""

from __future__ import annotations

import pickle

from .. import config
from ..transport.packing import ARRAY, PICKLED, VALUE
from . import contract
from .contract import ALIGN, SLAB_BYTES, SLAB_ITEM_MAX, ZERO_COPY_MIN

#: Values that cannot change after the call, so they may be pickled later with the batch.
_IMMUTABLE = frozenset({int, float, bool, complex, str, bytes, type(None)})


class KeyNotStr(Exception):
    """A key that is not a str (checked here, in the one pass over the publication)."""

    def __init__(self, key):
        super().__init__(key)
        self.key = key


class ValueNotSendable(Exception):
    """A value that cannot be serialised (carries the key, so the caller can name it)."""

    def __init__(self, key: str, exc: BaseException):
        super().__init__(key, exc)
        self.key = key
        self.exc = exc


_plain_dtypes = contract.PLAIN_DTYPES  # dtype -> its str, or "" when it must be pickled


def _plain_dtype_str(dt) -> str:
    """``dt.str`` when an array of it is plain bytes that ``np.dtype(str)`` rebuilds exactly
    (no objects, fields or sub-arrays); else "" (such arrays are pickled)."""
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        return ""
    return dt.str


def _np():
    import numpy

    return numpy


class _BatchFields:
    """Batch's fields (contract.BATCH_FIELDS), where the C publish path (_fastpub.BatchBase)
    is not built."""

    __slots__ = tuple(name for name, _ in contract.BATCH_FIELDS)

    def __init__(self, task_id: int, pool):
        self.task_id = task_id
        self.pubs: list = []
        self.recycle: list = []
        self.nbytes = 0
        self.first_t = 0.0
        self._pool = pool
        self._bufs: list = []
        self._slab = None
        self._slab_mv = None
        self._slab_index = -1
        self._slab_off = 0


fastpub = None  # mpipub.engine._fastpub when it is built and not turned off (see _fastpub.c)
if not config.get("MPIPUB_PURE_PYTHON"):
    try:
        from . import _fastpub as fastpub
    except ImportError:
        pass


class Batch(_BatchFields if fastpub is None else fastpub.BatchBase):  # type: ignore[misc]
    """Publications of one task not yet sent (engine side, filled by ``add``, or by
    ``_fastpub`` for plain publications, which appends exactly what ``add`` would).

    ``buffers()`` are what the message carries after its metadata: the used part of each
    slab and the dedicated buffers; ``recycle`` holds the pooled buffers to give back once
    the send has completed.
    """

    __slots__ = ()

    def __len__(self) -> int:
        return len(self.pubs)

    def add(self, step: int, t: float, data, copy: bool) -> int:
        """Append one publication; returns its payload bytes. Raises KeyNotStr or
        ValueNotSendable, and then appends nothing."""
        entries = []
        nbytes = 0
        for key, v in data.items():
            if type(key) is not str and not isinstance(key, str):
                raise KeyNotStr(key)
            tv = type(v)
            if tv in _IMMUTABLE:
                entries.append((key, VALUE, v))
                nbytes += 8
                continue
            np = _np()
            if tv is np.ndarray:
                dts = _plain_dtypes.get(v.dtype)
                if dts is None:
                    dts = _plain_dtypes[v.dtype] = _plain_dtype_str(v.dtype)
                if dts:
                    n = v.nbytes
                    where = self._place(v, n, copy, np)
                    if where is not None:
                        entries.append((key, ARRAY, dts, v.shape, v.size) + where)
                        nbytes += n
                        continue
            if isinstance(v, np.generic) and tv is not np.void:
                # numpy scalars are immutable (but a structured np.void can view an array)
                entries.append((key, VALUE, v))
                nbytes += v.nbytes
                continue
            pbufs: list = []
            try:
                body = pickle.dumps(v, protocol=5, buffer_callback=pbufs.append)
            except Exception as exc:  # noqa: BLE001 - reported with the key by the caller
                raise ValueNotSendable(key, exc) from exc
            refs = []
            for pb in pbufs:
                raw = pb.raw()
                refs.append(self._place(raw, raw.nbytes, copy, np) + (raw.nbytes,))
                nbytes += raw.nbytes
            entries.append((key, PICKLED, body, tuple(refs)))
            nbytes += len(body)
        if not self.pubs:
            self.first_t = t
        self.pubs.append((step, t, nbytes, entries))
        self.nbytes += nbytes
        return nbytes

    def _place(self, v, n: int, copy: bool, np) -> tuple[int, int] | None:
        """Put the ``n`` raw bytes of ``v`` where the message will carry them and return
        (buffer index, offset); None when ``v`` exports no plain buffer (it is pickled)."""
        if n <= SLAB_ITEM_MAX:
            off = self._slab_off
            if self._slab is None or off + n > SLAB_BYTES:
                self._new_slab()
                off = 0
            try:
                self._slab_mv[off:off + n] = memoryview(v).cast("B")
            except (TypeError, ValueError):  # not C-contiguous, or a non-native format
                try:
                    np.copyto(self._slab[off:off + n].view(v.dtype).reshape(v.shape), v)
                except (TypeError, ValueError, AttributeError):
                    return None
            self._slab_off = off + n + (-n % ALIGN)
            return self._slab_index, off
        if isinstance(v, memoryview):  # an out-of-band pickle buffer: C-contiguous bytes
            if copy or n < ZERO_COPY_MIN:
                raw = self._pool.take(n)
                memoryview(raw)[:] = v
                self.recycle.append(raw)
            else:
                raw = v
        elif not copy and n >= ZERO_COPY_MIN and v.flags.c_contiguous:
            raw = v.reshape(-1).view(np.uint8)
        else:
            raw = self._pool.take(n)
            try:
                np.copyto(raw.view(v.dtype).reshape(v.shape), v)  # releases the GIL
            except (TypeError, ValueError):
                self._pool.give(raw)
                return None
            self.recycle.append(raw)
        self._bufs.append(raw)
        return len(self._bufs) - 1, 0

    def _new_slab(self) -> None:
        self._trim_slab()
        slab = self._pool.take(SLAB_BYTES)
        self.recycle.append(slab)
        self._slab = slab
        self._slab_mv = memoryview(slab)
        self._slab_off = 0
        self._bufs.append(slab)
        self._slab_index = len(self._bufs) - 1

    def _trim_slab(self) -> None:
        if self._slab is not None:
            self._bufs[self._slab_index] = self._slab[:self._slab_off]

    def buffers(self) -> list:
        """The raw buffers to send (call once, when the batch is complete)."""
        self._trim_slab()
        self._slab = None
        return self._bufs

    def metadata(self) -> bytes:
        return pickle.dumps(self.pubs, protocol=5)
