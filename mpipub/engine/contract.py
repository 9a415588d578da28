"""The C publish path's contract, declared once: the constants, the shared fields and the
accepted values that ``_fastpub.c`` and the Python path (``batch.py``, ``sender.py``) both use.

``batch.py`` and ``sender.py`` take their constants from here. ``_fastpub`` reads them from
here when it is imported (and again on ``_fastpub.read_contract()``, for tests that change
one), and checks that its C structs have exactly the fields declared in ``BATCH_FIELDS`` and
``SENDER_FIELDS``, in order and of the declared kinds: a mismatch (say, a field added here and
not in C, or an extension built from older sources) stops the import with a RuntimeError that
names the field. The sink's accepted values come from ``mpipub.sink.rules``, the table
``sink.layout.check_value`` reads too.

Why each value is what it is: docs/benchmarks.md, "Why the constants are what they are".
"""

from __future__ import annotations

from ..sink import rules
from ..transport.packing import ARRAY, VALUE

# -- the batch (engine/batch.py) ------------------------------------------------------------------
#: Arrays (and out-of-band pickle buffers) up to this size are copied into a shared slab;
#: larger ones get a buffer of their own. A slab is as large as a batch (BATCH_BYTES), so a
#: batch of arrays up to 1 MiB travels as one header and one buffer: every message costs
#: rank 0's one I/O thread a probe, two receives and its bookkeeping (docs/benchmarks.md,
#: "Why the constants are what they are").
SLAB_ITEM_MAX = 1 << 20
SLAB_BYTES = 4 << 20
#: ``copy=False`` sends arrays from their own memory only from this size: below it a copy
#: into a pooled buffer is faster end to end. numpy puts arrays under 4 MiB on ordinary
#: pages, the kernel's single-copy transfer reads those at about half speed (pooled buffers
#: are on huge pages), and the copy is still in cache when rank 0 reads it.
ZERO_COPY_MIN = 4 << 20
#: Slab offsets are multiples of this: arrays rebuilt on the client are aligned for SIMD loads.
ALIGN = 64

# -- when a batch is sealed and the flusher woken (engine/sender.py) ------------------------------
#: A batch is sent by the publishing thread once it holds this many bytes or publications,
#: or is this old (seconds): bounds the client's staleness during a tight loop. Bytes: one
#: slab (SLAB_BYTES).
BATCH_BYTES = 4 << 20
BATCH_PUBS = 256
MAX_AGE_S = 0.002
#: A publication does not wake the flusher when it will look by itself within this long
#: (seconds): waking a sleeping thread costs the caller more than half of a 64 KiB copy.
WAKE_SLACK_S = 0.5e-3

# -- what the C path writes -----------------------------------------------------------------------
#: Entry kinds of a batch's metadata (the wire format, transport/packing.py).
VALUE_CODE = VALUE
ARRAY_CODE = ARRAY
#: numpy dtype -> its ``dtype.str`` when arrays of it are plain bytes, "" when they are
#: pickled. Filled by ``Batch.add`` (Python decides); the C path takes arrays only of dtypes
#: found plain here.
PLAIN_DTYPES: dict = {}
#: With a sink on, the C path takes only values this table surely accepts (mpipub/sink/rules.py).
SINK_RULES = rules

# -- the fields both paths share (the C base classes' members, in this order) --------------------
#: ``Batch`` (engine/batch.py): the open batch. Kinds: "object", "ssize" (Py_ssize_t),
#: "double", "bool".
BATCH_FIELDS = (
    ("task_id", "object"), ("pubs", "object"), ("recycle", "object"), ("_bufs", "object"),
    ("_slab", "object"), ("_slab_mv", "object"), ("_pool", "object"), ("nbytes", "ssize"),
    ("_slab_index", "ssize"), ("_slab_off", "ssize"), ("first_t", "double"),
)
#: ``Sender`` (engine/sender.py). Its per-task publishing state is ``task_id``, ``step``,
#: ``next_abort_poll`` and ``check_value`` (the sink's check, or None: the C path is stricter
#: while it is set); ``Sender.begin_task`` / ``end_task`` set it.
SENDER_FIELDS = (
    ("batch", "object"), ("batch_type", "object"), ("sealed", "object"),
    ("ready_slab", "object"), ("task_id", "object"), ("check_value", "object"),
    ("error", "object"), ("pool", "object"), ("_lock_acquire", "object"),
    ("_lock_release", "object"), ("_wake_release", "object"), ("step", "ssize"),
    ("last_add", "double"), ("wakes_at", "double"), ("next_abort_poll", "double"),
)
