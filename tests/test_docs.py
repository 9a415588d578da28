"""The documentation stays true to the code: every public name and every public method or
property of a public class has a docstring (the API reference, docs/api.rst, is generated from
them; CI builds it with warnings as errors), the reference names every public name, and the
README's test and docs commands are the ones .ci/run runs. No MPI job is started here."""

from __future__ import annotations

import inspect
import re

import mpipub
import mpipub.launcher
import mpipub.plot
from conftest import ROOT


def public_objects() -> dict[str, object]:
    """What a user reaches: ``mpipub.__all__``, ``mpipub.open``, ``mpipub.plot.live`` and the
    launcher's public functions (README, "Open MPI")."""
    objs = {f"mpipub.{n}": getattr(mpipub, n) for n in [*mpipub.__all__, "open"]}
    objs["mpipub.plot.live"] = mpipub.plot.live
    objs.update({f"mpipub.launcher.{n}": getattr(mpipub.launcher, n)
                 for n in mpipub.launcher.__all__})
    return objs


def undocumented_members(cls: type) -> list[str]:
    """Public methods and properties of ``cls`` (and of its mpipub base classes) with no
    docstring of their own."""
    missing = []
    seen = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("mpipub"):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            seen.add(name)
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property) or inspect.isfunction(member):
                if not (member.__doc__ or "").strip():
                    missing.append(f"{cls.__name__}.{name}")
    return missing


def test_every_public_name_and_member_has_a_docstring():
    missing = []
    for name, obj in public_objects().items():
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(name)
        if inspect.isclass(obj):
            missing += undocumented_members(obj)
    assert not missing, f"no docstring (the API reference would show nothing): {missing}"


def test_the_api_reference_names_every_public_name():
    text = (ROOT / "docs" / "api.rst").read_text()
    documented = set(re.findall(r"^\.\. auto(?:class|function|exception):: (\S+)", text, re.M))
    assert not set(public_objects()) - documented, sorted(set(public_objects()) - documented)
    assert ".. mpipub-cli::" in text  # the command's help, from its parser


def test_ci_runs_the_readme_test_and_docs_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"^```bash\n(.*?)\n```", readme, re.S | re.M)
    tests = [c for c in blocks if "pytest" in c]
    docs = [c for c in blocks if "sphinx-build" in c]
    assert len(tests) == 2 and len(docs) == 1, "the README's test and docs commands"
    for command in tests + docs:
        assert command in ci, command


def test_the_design_page_names_every_module():
    """docs/design.md's module table is the map of the code: every module is named there
    (``bench/`` is listed as one entry; a subpackage's ``__init__.py`` is its folder's row)."""
    text = (ROOT / "docs" / "design.md").read_text()
    pkg = ROOT / "mpipub"
    missing = []
    for path in sorted([*pkg.rglob("*.py"), *pkg.rglob("*.c")]):
        rel = path.relative_to(pkg)
        if rel.parts[0] == "bench":
            if "`bench/`" not in text:
                missing.append("bench/")
            continue
        if rel.name == "__init__.py" and len(rel.parts) > 1:
            name = "/".join(rel.parts[:-1]) + "/"
        else:
            name = rel.name
        if f"`{name}`" not in text and f"`{rel.as_posix()}`" not in text:
            missing.append(rel.as_posix())
    assert not missing, f"docs/design.md does not name: {sorted(set(missing))}"
