"""The package's layout is its architecture: imports run one way between the sides.

Read from the source (every ``import``, also those inside functions), so a lazy import that
crosses a side is caught too; nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mpipub"


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (absolute names; ``from a import b`` counts as ``a.b``
    when that is a module, else as ``a``); imports for type checkers only are left out."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip = {id(n) for t in ast.walk(tree) if _is_type_checking(t) for n in ast.walk(t)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in MODULES else mod)
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _in(mod: str, *packages: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in packages)


def _offenders(side: str, allowed) -> list[str]:
    return sorted(f"{name} imports {m}" for name, mods in GRAPH.items() if _in(name, side)
                  for m in mods if not allowed(m))


def test_layout_has_the_sides():
    for side in ("transport", "engine", "client", "sink", "notebook", "bench"):
        init = PKG / side / "__init__.py"
        assert init.is_file(), init
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init}: a docstring that says what it may import"


def test_transport_imports_nothing_of_the_sides():
    def ok(m):
        return not _in(m, "mpipub") or _in(m, "mpipub.transport", "mpipub.errors",
                                           "mpipub.config") or m == "mpipub"
    assert _offenders("mpipub.transport", ok) == []


def test_engine_never_imports_rank_0s_side():
    # (of the sink, only its table of accepted values, which the C publish path applies too:
    # engine/contract.py)
    def ok(m):
        return not _in(m, "mpipub") or _in(m, "mpipub.engine", "mpipub.transport",
                                           "mpipub.errors", "mpipub.config") \
            or m in ("mpipub", "mpipub.sink", "mpipub.sink.rules")
    assert _offenders("mpipub.engine", ok) == []


def test_the_sinks_table_of_accepted_values_imports_nothing():
    assert {m for m in GRAPH["mpipub.sink.rules"] if _in(m, "mpipub", "numpy", "h5py")} == set()


def test_sink_imports_no_mpi():
    def ok(m):
        return not _in(m, "mpi4py", "mpipub") or _in(m, "mpipub.sink", "mpipub.errors") \
            or m == "mpipub"
    assert _offenders("mpipub.sink", ok) == []


def test_client_reaches_the_engine_only_through_its_entry_points():
    # Client() on an engine rank serves (engine.loop.serve_and_exit); the views send the
    # namespace tasks by reference (engine.namespace).
    def ok(m):
        return not _in(m, "mpipub.engine", "mpipub.notebook", "mpipub.bench", "mpipub.cli",
                       "mpipub.runner") or m in ("mpipub.engine.loop", "mpipub.engine.namespace")
    assert _offenders("mpipub.client", ok) == []


def test_only_the_benchmarks_import_the_benchmarks():
    assert [f"{n} imports {m}" for n, mods in GRAPH.items() if not _in(n, "mpipub.bench")
            for m in mods if _in(m, "mpipub.bench")] == []


def _cycles() -> list[list[str]]:
    """Import cycles between modules (a package's own ``__init__`` excluded: importing
    ``mpipub.x.y`` runs ``mpipub/__init__`` first, which is no dependency of y's)."""
    edges = {n: {m for m in mods if m in MODULES and not n.startswith(m + ".")}
             for n, mods in GRAPH.items()}
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(edges[n]):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n)
    return found


def test_no_import_cycles():
    assert _cycles() == []
