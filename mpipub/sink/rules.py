"""What a sink file can store: the one table of accepted values.

Two checks read it: ``layout.check_value`` (Python, on engines inside ``publish_data`` when a
sink is on; it names what is wrong) and the engine's C publish path (``engine/_fastpub.c``,
through ``engine/contract.py``), which takes a value only where this table surely accepts it
and leaves everything else to the Python check. Changing a rule here changes both. No numpy
and no MPI here: engines read it when the C path is imported.
"""

#: Python types whose plain values a sink stores (exact types: subclasses are refused).
SCALAR_TYPES = (int, float, bool, complex, str, bytes)
#: ints are stored as int64: the range they must fit.
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1
#: characters a str may not contain (HDF5 strings end at NUL); a str must also be valid
#: unicode (it is stored as UTF-8).
STR_FORBIDDEN = "\0"
#: numpy dtype kinds (``dtype.kind``) of arrays and numpy scalars a sink stores: bool, ints,
#: floats, complex, fixed-length bytes; never with fields (record dtypes).
ARRAY_KINDS = "biufcS"
