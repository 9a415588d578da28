"""Publications packed for the wire: many ``publish_data`` calls travel as one message.

Publications that come faster than MPI messages could carry them one by one are packed
into a *batch* (sender.py decides when it is sent): small arrays are copied side by side
into one *slab* (a pooled 4 MiB buffer), larger ones into their own pooled buffer (or, with
``copy=False`` from 4 MiB, sent from their own memory), plain immutable values ride in the
batch's metadata and anything else is pickled at the call (protocol 5, its buffers copied
like arrays). One ``pickle.dumps`` of the metadata and one or two ``Isend``s then carry the
whole batch, and the client rebuilds each publication with ``numpy.frombuffer`` views: per
publication that is a few microseconds on each side instead of a pickle, two MPI messages
and their bookkeeping.

The engine fills a batch (``mpipub.engine.batch``, and its C path); this module holds the
format both sides agree on and the client's decoding.

Metadata of a batch: ``[(step, time, nbytes, entries), ...]``, one tuple per publication,
where each entry is one of

    (key, VALUE, value)                                    int, float, str, bytes, None, ...
    (key, ARRAY, dtype.str, shape, count, buffer, offset)  a numpy array's raw bytes
    (key, PICKLED, body, ((buffer, offset, nbytes), ...))  anything else (protocol 5)

``buffer`` indexes the message's raw buffers (slabs and dedicated buffers, in order).
"""

from __future__ import annotations

import pickle
from typing import Callable

#: Entry kinds in a batch's metadata (the C path writes VALUE and ARRAY entries too).
VALUE = 0
ARRAY = 1
PICKLED = 2

def _np():
    import numpy

    return numpy


_dtypes: dict = {}


def _value(e, buffers, np):
    """The value of one metadata entry (arrays are views of ``buffers``, no copy)."""
    code = e[1]
    if code == VALUE:
        return e[2]
    if code == ARRAY:
        _, _, dts, shape, count, bi, off = e
        dt = _dtypes.get(dts)
        if dt is None:
            dt = _dtypes[dts] = np.dtype(dts)
        a = np.frombuffer(buffers[bi], dt, count, off) if count else np.empty(0, dt)
        return a.reshape(shape) if len(shape) != 1 else a
    _, _, pbody, refs = e
    views = [memoryview(buffers[bi])[off:off + n] for bi, off, n in refs]
    return pickle.loads(pbody, buffers=views)


def unpack(body, buffers, on_error: Callable | None = None) -> list:
    """Client side: a batch's publications as ``[(step, time, dict, nbytes), ...]``.

    Arrays are views of the received buffers (no copy); nothing but the metadata and
    values that were pickled on the engine goes through pickle. A value that cannot be
    rebuilt here is left out of its dict and reported as ``on_error(step, key, exc)``."""
    np = _np()
    out = []
    for step, t, nbytes, entries in pickle.loads(body):
        d = {}
        for e in entries:
            try:
                d[e[0]] = _value(e, buffers, np)
            except Exception as exc:  # noqa: BLE001 - reported; the other keys arrive
                if on_error is None:
                    raise
                on_error(step, e[0], exc)
        out.append((step, t, d, nbytes))
    return out


def latest(batches, on_error: Callable | None = None) -> dict:
    """The newest value of every key in ``batches`` (newest batch first; each a
    ``(body, buffers, publications or None)``): only the values that win are rebuilt, so
    merging many batches costs one metadata unpickle each, not one array per publication.
    A value that cannot be rebuilt is reported (``on_error(step, key, exc)``) and the
    key's previous value wins."""
    np = _np()
    out: dict = {}
    for body, buffers, pubs in batches:
        if pubs is not None:  # already decoded (a stream() reader did)
            for p in reversed(pubs):
                for k, v in p[2].items():
                    if k not in out:
                        out[k] = v
            continue
        for step, _, _, entries in reversed(pickle.loads(body)):
            for e in entries:
                key = e[0]
                if key in out:
                    continue
                try:
                    out[key] = _value(e, buffers, np)
                except Exception as exc:  # noqa: BLE001 - reported; an older value wins
                    if on_error is None:
                        raise
                    on_error(step, key, exc)
    return out
