"""Every ``MPIPUB_*`` environment variable, read and checked in one place.

Each setting has a default; the environment overrides it; a bad value is a one-line
``ConfigError`` naming the variable and what it accepts (never a bare ``float()`` traceback).
Values are read when a module first needs them (at its import, on every rank), so the same
environment gives every rank the same settings. docs/configuration.md is the table of these.
"""

from __future__ import annotations

import os

from .errors import ConfigError


class Setting:
    """One variable: its default and what it accepts."""

    __slots__ = ("name", "default", "kind", "help")

    def __init__(self, name: str, default, kind: str, help: str):
        self.name, self.default, self.kind, self.help = name, default, kind, help

    def parse(self, raw: str):
        text = raw.strip()
        try:
            if self.kind == "bool":
                if text.lower() in ("", "0", "false", "no", "off"):
                    return False
                if text.lower() in ("1", "true", "yes", "on"):
                    return True
                raise ValueError(text)
            value = int(text) if self.kind == "count" else float(text)
        except ValueError:
            raise ConfigError(f"{self.name}={raw!r}: expected {self.accepts()}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise ConfigError(f"{self.name}={raw!r}: expected {self.accepts()}")
        return value

    def accepts(self) -> str:
        what = {"seconds": "a number of seconds > 0", "count": "a whole number > 0",
                "bool": "1 or 0 (true/false, yes/no, on/off)"}[self.kind]
        return f"{what} (default {self.default!r}: {self.help})"


SETTINGS = {s.name: s for s in [
    Setting("MPIPUB_CLOSE_TIMEOUT_S", 10.0, "seconds",
            "how long rank 0 waits for engines to stop at the end before MPI_Abort"),
    Setting("MPIPUB_ENGINE_POLL_MAX_S", 0.004, "seconds",
            "an idle engine's longest sleep between polls for a task"),
    Setting("MPIPUB_CLIENT_POLL_MAX_S", 0.0005, "seconds",
            "rank 0's I/O thread's longest sleep between polls while a task runs"),
    Setting("MPIPUB_MAX_OUTSTANDING_BYTES", 4 << 20, "count",
            "bytes an engine may have sent and rank 0 not yet received before publish_data "
            "waits"),
    Setting("MPIPUB_MAX_OUTSTANDING_COUNT", 1024, "count",
            "publications an engine may have in flight before publish_data waits"),
    Setting("MPIPUB_LINGER_S", 0.0001, "seconds",
            "how long the engine's flusher lets a batch wait for the next step"),
    Setting("MPIPUB_KERNEL_STOP_TIMEOUT_S", 1.5, "seconds",
            "how long a notebook kernel's shutdown waits for busy engines before MPI_Abort"),
    Setting("MPIPUB_PURE_PYTHON", False, "bool",
            "turn the C path of publish_data off"),
]}


def get(name: str):
    """The value of setting ``name``: from the environment when set there, else its
    default."""
    s = SETTINGS[name]
    raw = os.environ.get(name)
    if raw is None:
        return s.default
    return s.parse(raw)
