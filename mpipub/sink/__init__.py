"""The HDF5 sink: the writer thread on rank 0 that stores every publication (``writer``), the
file's layout shared by writer and reader (``layout``), reading finished, live or damaged
files (``reader``, ``h5file``: ``mpipub.open`` / ``Run``), and ``mpipub info / plot / watch``
(``sinkcli``), and the table of values a file can store (``rules``: the engines' C publish
path reads it too).

It imports no MPI and nothing of ``transport``, ``engine`` or ``client``: a sink file is
read on any machine, with h5py only (tests/test_layout.py checks the direction).
"""
