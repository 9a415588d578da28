"""The transport both sides share: MPI start-up and the runtime's communicators and tags
(``comm``), the message format, the bounded outbox and the buffer pools (``wire``), the
format of a batch of publications and its decoding (``packing``), and the growing sleep of
every loop that polls MPI (``polling``).

It may import ``mpipub.errors`` and ``mpipub.config`` only: nothing of ``client``, ``engine``
or ``sink`` (tests/test_layout.py checks the direction).
"""
