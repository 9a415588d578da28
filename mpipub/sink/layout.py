"""The on-disk layout of an mpipub sink file, shared by the writer (``writer.py``) and the reader
(``reader.py``), and the value checker engines run when a sink is on.

Layout (format version 2; see docs/sink.md)::

    /                                   attrs: mpipub_format=2, created, nranks, hosts
    /task_0001/                         attrs: task_id, label, function, args, kwargs,
                                               start, end (NaN until the task ends), engines
    /task_0001/engine_1/                attrs: rank, host
        step        int64   (n,)        step of every publication, in arrival order
        time        float64 (n,)        when the engine called publish_data (unix seconds)
        received    float64 (n,)        when rank 0 received it (unix seconds)
        index       (k,) compound       one row per dataset in data/: name, kind, version,
                                        first (see below)
        data/<key>  (m, *shape)         one dataset per key, one row per publication of it
        steps/<key> int64 (m,)          step of each row of data/<key>, for sparse datasets only

A dataset is *dense* (``first`` >= 0) when its rows are the engine's publications ``first``,
``first + 1``, ...: row i's step is ``step[first + i]``, and it has no ``steps/`` dataset. A key
that skips a publication continues in a new, *sparse* dataset (``first`` = -1) whose steps are
in ``steps/<name>``. A nested dict value is a group in ``data/`` (and ``steps/``) with the same
structure. Names are keys with ``%``, ``/`` and ``@`` percent-escaped (``"."`` is ``%2E``,
``""`` is ``%``). When a key's dtype, shape or kind changes between steps, the writer starts a
new dataset ``<key>@1``, ``<key>@2``, ...; so it does when a dense dataset's key skips a
publication. ``kind`` tells how to turn a row back into the published Python value: array,
npscalar, int, float, bool, complex, str, bytes.

Format 1 (mpipub before 2026-12-04; still read): no ``index``; every dataset in data/ has a
``steps/`` dataset and attrs ``key``, ``kind``, ``version``.
"""

from __future__ import annotations

import numpy as np

from . import rules

FORMAT = 2
#: formats the reader reads
READ_FORMATS = (1, 2)
#: a row of an engine's ``index``: a dataset's path under data/ (escaped names, "/" between
#: nested dict levels), its kind, its version (the ``@N``), and for a dense dataset the
#: publication (row of ``step``) of its first row, -1 for a sparse one (h5py reads the
#: object field as a variable-length UTF-8 string)
INDEX_DTYPE = np.dtype([("name", np.dtype("O", metadata={"vlen": str})), ("kind", "S8"),
                        ("version", "<i4"), ("first", "<i8")])
TASK_FMT = "task_{:04d}"
ENGINE_FMT = "engine_{}"



def escape(key: str) -> str:
    if key == "":
        return "%"
    s = key.replace("%", "%25").replace("/", "%2F").replace("@", "%40")
    return "%2E" if s == "." else s


def unescape(name: str) -> str:
    """Name of a node in data/ -> the key (a version suffix ``@N`` is dropped)."""
    name = name.split("@", 1)[0]
    if name == "%":
        return ""
    return name.replace("%2F", "/").replace("%40", "@").replace("%2E", ".").replace("%25", "%")


# -- the checker (runs on engines, inside publish_data) ------------------------------------------
def check_value(key, value, _depth: int = 0) -> str | None:
    """Return why ``value`` cannot be stored in a sink file, or None if it can. The rules are
    the table in ``rules.py``, which the engine's C path reads too."""
    t = type(value)
    if t is np.ndarray:
        k = value.dtype.kind
        if k in rules.ARRAY_KINDS and value.dtype.fields is None:
            return None
        return (f"numpy arrays of dtype {value.dtype} cannot be stored in the HDF5 sink "
                "(numeric, bool or fixed-length bytes 'S' dtypes only)")
    if t in rules.SCALAR_TYPES:
        if t is int and not rules.INT_MIN <= value <= rules.INT_MAX:
            return "int out of the 64-bit range cannot be stored in the HDF5 sink"
        if t is str:
            if any(c in value for c in rules.STR_FORBIDDEN):
                return "str containing NUL characters cannot be stored in the HDF5 sink"
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "str that is not valid unicode cannot be stored in the HDF5 sink"
        return None
    if isinstance(value, np.generic):
        if value.dtype.kind in rules.ARRAY_KINDS and value.dtype.fields is None:
            return None
        return f"numpy scalars of dtype {value.dtype} cannot be stored in the HDF5 sink"
    if isinstance(value, dict):
        if _depth > 32:
            return "dicts nested more than 32 deep cannot be stored in the HDF5 sink"
        for k, v in value.items():
            if not isinstance(k, str):
                return f"nested dict key {k!r} is not a str"
            p = check_value(k, v, _depth + 1)
            if p:
                return f"in nested key {k!r}: {p}"
        return None
    if isinstance(value, (int, float, complex, str, bytes, np.ndarray)):  # subclasses
        return (f"values of type {t.__name__} (a subclass) cannot be stored in the HDF5 sink; "
                "convert to the base type")
    return (f"values of type {t.__name__} cannot be stored in the HDF5 sink (numpy arrays, "
            "numbers, str, bytes and dicts of them only"
            + ("; use numpy.asarray()" if t in (list, tuple) else "") + ")")


def key_selected(key: str, include, exclude) -> bool:
    """include/exclude: None or sequences of fnmatch patterns on top-level keys."""
    from fnmatch import fnmatchcase

    if include is not None and not any(fnmatchcase(key, p) for p in include):
        return False
    if exclude is not None and any(fnmatchcase(key, p) for p in exclude):
        return False
    return True


def check_selected(include, exclude, key, value) -> str | None:
    """check_value for the keys the sink keeps (others are not stored, so not checked)."""
    if not key_selected(key, include, exclude):
        return None
    return check_value(key, value)


# -- leaves and their signatures (writer) -------------------------------------------------------
STR_DTYPE = None  # set lazily (h5py import)


def leaf_signature(value):
    """(kind, dtype, shape) of one stored value; values of one dataset share it."""
    t = type(value)
    if t is np.ndarray:
        return ("array", value.dtype, value.shape)
    if t is bool:
        return ("bool", np.dtype(bool), ())
    if t is int:
        return ("int", np.dtype(np.int64), ())
    if t is float:
        return ("float", np.dtype(np.float64), ())
    if t is complex:
        return ("complex", np.dtype(np.complex128), ())
    if t is str:
        return ("str", None, ())
    if t is bytes:
        return ("bytes", None, ())
    if isinstance(value, np.generic):
        return ("npscalar", value.dtype, ())
    raise TypeError(f"cannot store a value of type {t.__name__}")


def flatten(data: dict, prefix: tuple = ()):
    """Yield (path, value) for every leaf of a (nested) dict."""
    for k, v in data.items():
        if type(v) is dict or (isinstance(v, dict)):
            yield from flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


#: rows per chunk of a key's dataset at most: every dataset holds at least one whole chunk on
#: disk, so this is what a key published once costs (512 scalars, 4 KiB, as netCDF-4 chunks a
#: 1-D record variable; 8192 made a 10,000-key publication a 1.3 GB file)
MAX_CHUNK_ROWS = 512


def chunk_rows(shape: tuple, itemsize: int, target: int = 256 << 10) -> tuple:
    """Chunk shape for appends: about ``target`` bytes, whole rows when a row fits (at most
    ``MAX_CHUNK_ROWS`` of them)."""
    row = max(1, int(np.prod(shape, dtype=np.int64)) * max(itemsize, 1))
    inner = [max(1, s) for s in shape]
    if row <= target:
        return (int(min(max(1, target // row), MAX_CHUNK_ROWS)), *inner)
    # one row is bigger than the target: keep it within 16 MiB by splitting inner dims
    size = row
    while size > (16 << 20):
        i = int(np.argmax(inner))
        if inner[i] == 1:
            break
        inner[i] = (inner[i] + 1) // 2
        size = int(np.prod(inner, dtype=np.int64)) * max(itemsize, 1)
    return (1, *inner)


def to_python(kind: str, row):
    """A row read from a leaf dataset -> the value that was published."""
    if kind == "array":
        return np.array(row)
    if kind == "npscalar":
        return row[()] if isinstance(row, np.ndarray) else row
    if kind == "int":
        return int(row)
    if kind == "float":
        return float(row)
    if kind == "bool":
        return bool(row)
    if kind == "complex":
        return complex(row)
    if kind == "str":
        return row.decode("utf-8") if isinstance(row, bytes) else str(row)
    if kind == "bytes":
        return np.asarray(row, dtype=np.uint8).tobytes()
    raise ValueError(f"unknown value kind {kind!r} in the file")
