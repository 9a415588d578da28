"""HDF5 calls the sink's writer makes through ctypes instead of h5py, where h5py's own work
around a call costs as much as the call.

* ``dataset_calls()``: ``H5Dcreate2``, ``H5Dwrite_chunk`` and ``H5Dclose`` on plain integer
  ids, holding the GIL (``ctypes.PyDLL``). A publication with thousands of new keys makes a
  dataset per key and engine; through h5py each one also cost an ``ObjectID`` (its registry,
  its error-handler set-up) and its destruction: about a third of the writer's time for
  10,000 keys (docs/benchmarks.md, "Sink format 2"). The GIL is kept because each call is
  short (tens of microseconds); releasing it twice per dataset made the writer and rank 0's
  I/O thread hand it back and forth.
* ``gil_free_chunk_writer()``: ``H5Dwrite_chunk`` releasing the GIL while HDF5 copies a large
  chunk to the file, so that the client keeps receiving meanwhile.

Both hold h5py's lock (``phil``) or are called by the writer while it holds it, so no other
thread is inside HDF5 at the same time. Both are None where the library h5py loaded cannot be
found (``h5file.libhdf5``); the writer then makes the same calls through h5py.
"""

from __future__ import annotations

import ctypes
import functools
import types

import numpy as np

from .h5file import libhdf5

_HID = ctypes.c_int64


@functools.lru_cache(maxsize=1)
def dataset_calls() -> types.SimpleNamespace | None:
    """``create(loc, name, type, space, lcpl, dcpl, dapl) -> id`` (< 0: failed),
    ``write_chunk(id, dxpl, filters, offsets, nbytes, address) -> status``,
    ``close(id) -> status``; H5P_DEFAULT is 0. None where HDF5 cannot be reached."""
    lib = libhdf5()
    if lib is None:
        return None
    try:
        glib = ctypes.PyDLL(lib._name)  # the same loaded library; its calls keep the GIL
        create = glib.H5Dcreate2
        create.restype = _HID
        create.argtypes = [_HID, ctypes.c_char_p, _HID, _HID, _HID, _HID, _HID]
        write_chunk = glib.H5Dwrite_chunk
        write_chunk.restype = ctypes.c_int
        write_chunk.argtypes = [_HID, _HID, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t,
                                ctypes.c_void_p]
        close = glib.H5Dclose
        close.restype = ctypes.c_int
        close.argtypes = [_HID]
    except Exception:  # noqa: BLE001 - any surprise: h5py's calls
        return None
    return types.SimpleNamespace(create=create, write_chunk=write_chunk, close=close)


def gil_free_chunk_writer():
    """H5Dwrite_chunk called through ctypes, which releases the GIL while HDF5 copies the chunk
    to the file (h5py holds the GIL in every call): the client's I/O thread keeps receiving
    while the writer writes. h5py's lock (``phil``) is held, so no other thread is inside
    HDF5 meanwhile (threads waiting for it release the GIL). None where the HDF5 library that
    h5py loaded cannot be found (then h5py's write_direct_chunk is used)."""
    try:
        from h5py._objects import phil

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
