"""Sphinx directive ``mpipub-cli``: the ``mpipub`` command's help, one section per command
(and per ``kernel`` subcommand), taken from the argparse parser itself, so the reference
cannot drift from what ``mpipub COMMAND --help`` prints."""

from __future__ import annotations

import argparse
import os

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


def _subcommands(parser: argparse.ArgumentParser, prefix: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from _subcommands(sub, f"{prefix} {name}")


class MpipubCli(SphinxDirective):
    has_content = False

    def run(self):
        os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: the same page anywhere
        from mpipub.cli import _parser

        out = []
        for name, sub in _subcommands(_parser(), "mpipub"):
            sec = nodes.section(ids=[nodes.make_id(name)])
            sec += nodes.title(text=name)
            sec += nodes.literal_block(text=sub.format_help().rstrip())
            out.append(sec)
        return out


def setup(app):
    app.add_directive("mpipub-cli", MpipubCli)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
