"""The engines' namespace as the client's views reach it: push, pull, execute, clear, map,
and ``Reference`` (a name resolved on the engine).

The ``run_*`` functions run on engines as tasks; they live in this importable module so that
they travel by reference, not by value. Names may be dotted (``"a.b"``: attribute ``b`` of
``a``); nothing is ``eval``-ed.
"""

from __future__ import annotations

import builtins

from .loop import current_engine


class Reference:
    """A name in the engines' namespace, given where a value is expected and resolved on
    each engine when the task starts: in ``apply``'s arguments and keywords (also inside
    lists, tuples and dicts), and as ``map``'s function or items. ``name`` may be dotted
    (``Reference("a.b")``)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        split_path(name)
        self.name = name

    def __repr__(self) -> str:
        return f"Reference({self.name!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Reference) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("mpipub.Reference", self.name))

    def __reduce__(self):
        return (Reference, (self.name,))


def split_path(name) -> list[str]:
    """``"a.b"`` -> ``["a", "b"]``; a clear error for anything that is not a (dotted) name."""
    if not isinstance(name, str):
        raise TypeError(f"engine names are str, not {type(name).__name__} ({name!r})")
    parts = name.split(".")
    if not all(p.isidentifier() for p in parts):
        raise ValueError(f"{name!r} is not a name or a dotted name (like 'x' or 'x.attr')")
    return parts


def contains_reference(obj, depth: int = 0) -> bool:
    """Whether ``obj`` is or holds (in lists, tuples, dict values) a Reference."""
    if isinstance(obj, Reference):
        return True
    if depth > 8:
        return False
    if isinstance(obj, (list, tuple)):
        return any(contains_reference(x, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return any(contains_reference(x, depth + 1) for x in obj.values())
    return False


def resolve(obj, ns: dict, rank: int, depth: int = 0):
    """``obj`` with every Reference replaced by its value in ``ns``."""
    if isinstance(obj, Reference):
        return get_path(ns, obj.name, rank)
    if depth > 8:
        return obj
    if isinstance(obj, list):
        return [resolve(x, ns, rank, depth + 1) for x in obj]
    if isinstance(obj, tuple):
        items = [resolve(x, ns, rank, depth + 1) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, dict):
        return {k: resolve(v, ns, rank, depth + 1) for k, v in obj.items()}
    return obj


def get_path(ns: dict, name: str, rank: int):
    parts = split_path(name)
    if parts[0] not in ns:
        raise NameError(f"name {parts[0]!r} is not defined on engine {rank}")
    value = ns[parts[0]]
    for p in parts[1:]:
        value = getattr(value, p)
    return value


def set_path(ns: dict, name: str, value, rank: int) -> None:
    parts = split_path(name)
    if len(parts) == 1:
        ns[name] = value
    else:
        setattr(get_path(ns, ".".join(parts[:-1]), rank), parts[-1], value)


# -- tasks the views send ---------------------------------------------------------------------
def _engine():
    eng = current_engine()
    if eng is None:
        raise RuntimeError("this runs on an mpipub engine only")
    return eng


def run_execute(code: str, filename: str | None = None) -> None:
    eng = _engine()
    exec(compile(code, filename or f"<execute on engine {eng.rank}>", "exec"), eng.namespace)


def run_push(values: dict) -> None:
    # functions from __main__ run in the engine's namespace, also when code run by
    # execute() calls them by the pushed name (as they do through apply)
    eng = _engine()
    for k, v in values.items():
        set_path(eng.namespace, k, eng._bind(v), eng.rank)


def run_pull(names):
    eng = _engine()
    if isinstance(names, str):
        return get_path(eng.namespace, names, eng.rank)
    return [get_path(eng.namespace, n, eng.rank) for n in names]


def run_clear() -> None:
    ns = _engine().namespace
    ns.clear()
    ns.update({"__name__": "__mpipub_engine__", "__builtins__": builtins})


def call_resolved(fn, args: tuple, kwargs: dict):
    """apply() with References among the function, arguments or keywords."""
    eng = _engine()
    ns = eng.namespace
    fn = eng._bind(resolve(fn, ns, eng.rank))
    return fn(*resolve(args, ns, eng.rank), **resolve(kwargs, ns, eng.rank))


def run_map(fn, arg_tuples: list) -> list:
    eng = _engine()
    ns = eng.namespace
    f = eng._bind(resolve(fn, ns, eng.rank))
    if not contains_reference(arg_tuples):  # (resolve copies every list it walks)
        return [f(*a) for a in arg_tuples]
    return [f(*resolve(a, ns, eng.rank)) for a in arg_tuples]
