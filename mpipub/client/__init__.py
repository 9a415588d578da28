"""Rank 0's side: ``Client`` and ``DirectView`` and the runtime behind them (``client``),
``AsyncResult`` and what a task's record keeps (``asyncresult``), the I/O thread that does
every receive on rank 0 (``iothread``), and how rank 0 ends on exit or a signal (``ending``).

It may import ``transport``, ``errors``, ``config``, the sink (rank 0 writes it) and, of the
engine side, only what a client hands to engines or runs when ``Client()`` is called on an
engine rank (``engine.loop.serve_and_exit``, the tasks in ``engine.namespace``). Nothing of
the engine side imports this package (tests/test_layout.py checks the direction).
"""
