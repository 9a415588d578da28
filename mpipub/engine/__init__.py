"""The engine side (every rank but 0): the serve loop that polls for tasks, runs them and
forwards their output (``loop``), the engine's send side with its flusher thread
(``sender``), the open batch that ``publish_data`` fills (``batch``, with its common case in
C: ``_fastpub.c``, whose constants, shared fields and accepted values are declared once in
``contract``), ``publish_data`` and ``engine_comm`` themselves (``datapub``), and the
namespace tasks behind the client's views (``namespace``).

It may import ``transport``, ``errors`` and ``config``, and of the sink only its table of
accepted values (``sink.rules``, which the C path applies): never ``client`` or the rest of
``sink`` (an engine rank never loads rank 0's side; tests/test_layout.py checks the direction).
"""
