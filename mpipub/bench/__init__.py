"""mpipub's benchmark suite: ``python -m mpipub.bench [--quick] [--out DIR]``.

Every figure is a ratio to a baseline measured in the same run (absolute times drift on shared
machines). Each group runs its own ``mpiexec`` job (``w_*.py`` workers); inside a job the
baseline and mpipub are measured interleaved, both warmed up, and the JSON keeps every repeat.
See benchmarks/README.md for the method.

The workers import mpipub as a user does (its public names) and, where a baseline must match
an engine's bound or format, the engine and transport modules; nothing in mpipub imports this
package, and its modules import no circle (tests/test_layout.py).
"""
