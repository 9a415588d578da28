"""``Backoff``: the sleep that grows while a polling loop finds nothing, shared by every loop
that polls MPI instead of blocking in it (a blocking MPICH call spins a whole core): idle
engines waiting for a task, rank 0's I/O thread, an engine waiting for its oldest send.
"""

from __future__ import annotations


class Backoff:
    """Delays for a poll loop: ``first``, then times ``growth`` each call, up to ``longest``;
    ``reset()`` after the loop found something. Each loop waits its own way (``time.sleep``,
    an ``Event.wait``) for ``next()`` seconds."""

    __slots__ = ("first", "growth", "longest", "delay")

    def __init__(self, first: float, growth: float, longest: float):
        self.first, self.growth, self.longest = first, growth, longest
        self.delay = first

    def next(self) -> float:
        """The delay to wait now (the next one is longer, up to ``longest``)."""
        d = self.delay
        self.delay = min(d * self.growth, self.longest)
        return d

    def reset(self) -> None:
        self.delay = self.first
