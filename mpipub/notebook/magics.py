"""``%px`` / ``%%px``: run a line or a cell on the engines, as ipyparallel users know them.

``%px CODE`` and ``%%px`` run on every engine and wait; ``--targets 1,3`` (or ``2``, ``1:3``)
chooses engines; ``%%px --noblock`` returns the AsyncResult instead of waiting. What the
engines print appears in the cell as ``[stdout:1] ...`` (live in the mpipub kernel, at the
end elsewhere); errors show each engine's traceback. Loaded with ``%load_ext mpipub`` (the
mpipub kernel loads it itself).
"""

from __future__ import annotations

import shlex

from IPython.core.magic import Magics, line_cell_magic, magics_class

from . import forward


class PxUsageError(ValueError):
    """A %px option was not understood (one line, naming it)."""


def parse_targets(text: str):
    """``all``, ``2``, ``1,3`` or ``1:3`` (a slice of MPI ranks) -> a view key."""
    text = text.strip()
    if text in ("all", ":", ""):
        return slice(None)
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            return slice(int(a) if a else None, int(b) if b else None)
        if "," in text:
            return [int(t) for t in text.split(",") if t.strip()]
        return int(text)
    except ValueError:
        raise PxUsageError(f"%px --targets: {text!r} is not an engine id, a list like 1,3 "
                           "or a range like 1:3")


def parse_options(line: str) -> tuple[dict, str]:
    """Leading ``--targets X``, ``--noblock``, ``--block`` options; the rest is code."""
    opts = {"targets": slice(None), "block": True}
    rest = line.lstrip()
    while rest.startswith("--"):
        word, _, after = rest.partition(" ")
        if word.startswith("--targets"):
            if "=" in word:
                value = word.split("=", 1)[1]
            else:
                parts = shlex.split(after)[:1]
                if not parts:
                    raise PxUsageError("%px --targets needs a value, e.g. --targets 1,3")
                value = parts[0]
                after = after.lstrip()[len(value):]
            opts["targets"] = parse_targets(value)
        elif word == "--noblock":
            opts["block"] = False
        elif word == "--block":
            opts["block"] = True
        else:
            raise PxUsageError(f"%px: unknown option {word!r} (known: --targets, --block, "
                               "--noblock)")
        rest = after.lstrip()
    return opts, rest


def print_outputs(ar) -> None:
    """Each engine's output with its rank in front, when it was not shown live."""
    import sys

    for e in ar.engine_ids:
        st = ar._rec.state[e]
        for name, chunks, stream in (("stdout", st.stdout, sys.stdout),
                                     ("stderr", st.stderr, sys.stderr)):
            text = "".join(chunks)
            if text:
                stream.write("".join(f"[{name}:{e}] {ln}"
                                     for ln in text.splitlines(keepends=True)))
                if not text.endswith("\n"):
                    stream.write("\n")


@magics_class
class PxMagics(Magics):
    """``%px`` and ``%%px`` over the mpipub client of this job."""

    @line_cell_magic
    def px(self, line: str, cell: str | None = None):
        """Run code on the engines: ``%px CODE`` or ``%%px [--targets 1,3] [--noblock]``."""
        from mpipub.client import client as _client

        try:
            opts, code = parse_options(line)
        except PxUsageError as exc:
            print(exc)
            return None
        if cell is not None:
            code = cell
        if not code.strip():
            print("%px: nothing to run")
            return None
        c = _client.Client()
        try:
            view = c[opts["targets"]]
        except (IndexError, TypeError) as exc:
            print(f"%px --targets: {exc}")
            return None
        ar = view.execute(code, block=False)
        if not opts["block"]:
            return ar
        live = c._rt.observer is not None
        try:
            ar.wait()
        finally:
            if not live and ar.ready():
                print_outputs(ar)
        ar.get()  # raises the engines' errors (rendered by forward.show_exception)
        return None


def load(ip) -> None:
    """``%load_ext mpipub``: the magics, and readable remote errors and interrupts."""
    ip.register_magics(PxMagics)
    forward.install_exception_display(ip)
