"""What a reader needs to know about an HDF5 file before trusting it, and an open whose reads
take a bounded time.

* ``superblock(path)``: the end-of-file address and the consistency flags HDF5 keeps in the
  file's first bytes. A file shorter than that address lost its end (copied or downloaded in
  part, a full disk, a truncated file): HDF5's own check for that is skipped when a file is
  opened for SWMR reading, and the missing bytes then read as zeros.
* ``open_swmr(path)``: SWMR-read open with few metadata read attempts. An SWMR reader re-reads
  metadata whose checksum is wrong, sleeping twice as long each time (1 ns, 2 ns, ... over
  HDF5's default 100 attempts: forever): a damaged file hung readers that way. 24 attempts
  retry for ~17 ms in all, which covers a read torn by a live writer.
* ``libhdf5()``: the HDF5 library h5py uses, through ctypes, for the calls h5py lacks.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
from dataclasses import dataclass

import h5py
from h5py import h5f, h5p

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: superblock file consistency flags (versions 2 and 3): opened for writing; SWMR writing
FLAG_WRITE = 0x1
FLAG_SWMR_WRITE = 0x4
#: metadata read attempts of an SWMR reader (see the module docstring)
SWMR_READ_ATTEMPTS = 24


@dataclass(frozen=True)
class Superblock:
    version: int
    flags: int  # file consistency flags: non-zero while a writer has the file open (or died)
    base: int  # base address (non-zero for a file with a user block)
    eof: int  # end-of-file address HDF5 recorded at its last flush
    size: int  # the file's size now

    @property
    def writer(self) -> bool:
        """A writer opened the file and did not close it: it is live, or it died."""
        return bool(self.flags & (FLAG_WRITE | FLAG_SWMR_WRITE))

    @property
    def missing(self) -> int:
        """Bytes missing at the end (0 for a whole file)."""
        return max(0, self.eof - self.size)  # HDF5's own check (H5Fsuper.c) compares these


def superblock(path) -> Superblock | None:
    """Read the superblock (at 0, 512, 1024, ... bytes); None where there is none."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        off = 0
        while True:
            fh.seek(off)
            head = fh.read(64)
            if head[:8] == _SIGNATURE and len(head) >= 12:
                break
            off = 512 if off == 0 else off * 2
            if off >= size:
                return None
        version = head[8]
        if version in (0, 1):
            so = head[13]
            flags = struct.unpack_from("<I", head, 20)[0]
            p = 24 + (4 if version == 1 else 0)
        elif version in (2, 3):
            so, flags, p = head[9], head[11], 12
        else:
            return None
        fmt = {4: "<4I", 8: "<4Q"}.get(so)
        if fmt is None or len(head) < p + 4 * so:
            return None
        base, _, eof, _ = struct.unpack_from(fmt, head, p)
        return Superblock(version, flags, base, eof, size)


@functools.lru_cache(maxsize=1)
def libhdf5():
    """The HDF5 library h5py loaded (ctypes.CDLL), or None where it cannot be found or is
    not the same version."""
    try:
        path = None
        with open("/proc/self/maps") as fh:
            for line in fh:
                p = line.rsplit(None, 1)[-1]
                b = os.path.basename(p)
                if b.startswith("libhdf5") and "_hl" not in b and ".so" in b:
                    path = p
                    break
        if path is None:
            return None
        lib = ctypes.CDLL(path)
        maj, mnr, rel = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint()
        if lib.H5get_libversion(ctypes.byref(maj), ctypes.byref(mnr), ctypes.byref(rel)) < 0 \
                or (maj.value, mnr.value, rel.value) != h5py.version.hdf5_version_tuple[:3]:
            return None
        return lib
    except Exception:  # noqa: BLE001 - no /proc, no ctypes: callers fall back to h5py
        return None


def open_swmr(path, attempts: int = SWMR_READ_ATTEMPTS) -> h5py.File:
    """``h5py.File(path, "r", swmr=True, locking=False)`` with ``attempts`` metadata read
    attempts (HDF5's default where the library cannot be reached through ctypes)."""
    lib = libhdf5()
    if lib is None:
        return h5py.File(path, "r", swmr=True, locking=False)
    fapl = h5p.create(h5p.FILE_ACCESS)
    fapl.set_fclose_degree(h5f.CLOSE_STRONG)  # as h5py.File does
    fapl.set_file_locking(False, True)
    fn = lib.H5Pset_metadata_read_attempts
    fn.argtypes = [ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(fapl.id, attempts) < 0:
        return h5py.File(path, "r", swmr=True, locking=False)
    fid = h5f.open(os.fsencode(os.fspath(path)), h5f.ACC_RDONLY | h5f.ACC_SWMR_READ, fapl=fapl)
    return h5py.File(fid)
