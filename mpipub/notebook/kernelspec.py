"""``mpipub kernel install | list | remove``: Jupyter kernelspecs that start an MPI job.

The kernelspec's argv is the whole job: ``<launcher> -n N+1 <python> -m mpipub.notebook.kernel
-f {connection_file}``, with absolute paths, so the kernel runs the same Python and MPI whatever
PATH the notebook server has. It uses Jupyter's "message" interrupt mode: in signal mode the
launcher forwards SIGINT to every rank, idle engines die and a second interrupt ends the job
(docs/design.md, "The notebook").
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

KERNEL_MODULE = "mpipub.notebook.kernel"
DEFAULT_ENGINES = 4


class KernelSpecError(Exception):
    """A kernelspec command cannot do what was asked; the message is one line for the user."""


def _ksm():
    try:
        from jupyter_client.kernelspec import KernelSpecManager
    except ImportError:
        raise KernelSpecError("jupyter_client is not installed: pip install 'mpipub[notebook]'")
    return KernelSpecManager()


def find_launcher(launcher: str | None) -> list[str]:
    """The launcher's words with its program as an absolute path: ``launcher`` (e.g. ``srun
    --mpi=pmi2`` or a path), else the ``mpiexec`` next to this Python, else the one on PATH."""
    if launcher:
        words = shlex.split(launcher)
        if not words:
            raise KernelSpecError("--mpiexec is empty")
        prog = shutil.which(words[0])
        if prog is None:
            raise KernelSpecError(f"--mpiexec: {words[0]!r} is not an executable program "
                                  "(not found on PATH)")
        return [os.path.abspath(prog), *words[1:]]
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.access(here, os.X_OK):
        return [here]
    prog = shutil.which("mpiexec")
    if prog is None:
        raise KernelSpecError(f"no mpiexec found next to {sys.executable} or on PATH: "
                              "pip install 'mpipub[mpich]', load your MPI module, or give "
                              "--mpiexec PATH")
    return [os.path.abspath(prog)]


def is_open_mpi(prog: str) -> bool:
    """Whether ``prog`` is Open MPI's mpiexec (it asks for flags the others refuse)."""
    if os.path.basename(prog) not in ("mpiexec", "mpirun", "orterun", "prterun"):
        return False
    try:
        out = subprocess.run([prog, "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    text = (out.stdout + out.stderr).lower()
    return "open mpi" in text or "openrte" in text or "open-mpi" in text


def make_spec(engines: int, launcher: list[str], display_name: str | None = None) -> dict:
    """The kernel.json content for ``engines`` engines started with ``launcher``."""
    if isinstance(engines, bool) or not isinstance(engines, int) or engines < 1:
        raise KernelSpecError(f"--engines must be a positive integer, got {engines!r}")
    nranks = engines + 1
    argv = [*launcher, "-n", str(nranks)]
    env: dict[str, str] = {}
    if is_open_mpi(launcher[0]):  # what mpipub.launcher adds for Open MPI (README, "Open MPI")
        from ..launcher import openmpi_flags

        argv += openmpi_flags(nranks)
    argv += [sys.executable, "-m", KERNEL_MODULE, "-f", "{connection_file}"]
    word = "engine" if engines == 1 else "engines"
    spec = {
        "argv": argv,
        "display_name": display_name or f"Python 3 (mpipub, {engines} {word})",
        "language": "python",
        "interrupt_mode": "message",
        "metadata": {"mpipub": {"engines": engines, "launcher": shlex.join(launcher)},
                     "debugger": False},
    }
    if env:
        spec["env"] = env
    return spec


def install(engines: int = DEFAULT_ENGINES, name: str | None = None,
            display_name: str | None = None, launcher: str | None = None, user: bool = False,
            prefix: str | None = None) -> str:
    """Write the kernelspec; return the directory it went to. Without ``user`` or ``prefix``
    it goes to Jupyter's system-wide directory (as ``ipython kernel install`` does)."""
    spec = make_spec(engines, find_launcher(launcher), display_name)
    import importlib.util

    if importlib.util.find_spec("ipykernel") is None:
        raise KernelSpecError(f"ipykernel is not installed for {sys.executable} (the kernel "
                              "runs it): pip install 'mpipub[notebook]'")
    name = name or f"mpipub-{engines}"
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise KernelSpecError(f"kernel name {name!r} may hold only letters, digits, '-', '_', '.'")
    ksm = _ksm()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, name)
        os.mkdir(src)
        with open(os.path.join(src, "kernel.json"), "w") as f:
            json.dump(spec, f, indent=1)
        try:
            return ksm.install_kernel_spec(src, name, user=user, prefix=prefix)
        except OSError as exc:
            raise KernelSpecError(f"cannot write the kernelspec {name!r}: {exc.strerror or exc}"
                                  f" ({exc.filename or ''}); try --user or --sys-prefix")


def mpipub_specs() -> dict[str, tuple[str, dict]]:
    """name -> (directory, kernel.json content) of every installed mpipub kernelspec."""
    out = {}
    for name, info in _ksm().get_all_specs().items():
        spec = info.get("spec", {})
        if KERNEL_MODULE in spec.get("argv", []):
            out[name] = (info.get("resource_dir", ""), spec)
    return out


def remove(name: str) -> str:
    """Remove the mpipub kernelspec ``name``; return the directory removed."""
    specs = mpipub_specs()
    if name not in specs:
        known = ", ".join(sorted(specs)) or "none installed"
        raise KernelSpecError(f"no mpipub kernel named {name!r} (mpipub kernels: {known})")
    try:
        return _ksm().remove_kernel_spec(name)
    except OSError as exc:
        raise KernelSpecError(f"cannot remove kernel {name!r}: {exc.strerror or exc} "
                              f"({exc.filename or specs[name][0]})")


# -- command line -------------------------------------------------------------------------------
def add_commands(sub) -> None:
    """Add ``kernel install|list|remove`` to the ``mpipub`` command line."""
    k = sub.add_parser("kernel", help="Jupyter kernels that are rank 0 of an MPI job",
                       description="Install, list and remove Jupyter kernels that run as rank 0 "
                       "of an MPI job, with engines on the other ranks.")
    ksub = k.add_subparsers(dest="kernel_command", required=True)
    i = ksub.add_parser("install", help="install a kernelspec")
    i.add_argument("--engines", default=str(DEFAULT_ENGINES), metavar="N",
                   help=f"number of engines (MPI ranks besides rank 0; {DEFAULT_ENGINES})")
    i.add_argument("--name", help="kernelspec name (default mpipub-N)")
    i.add_argument("--display-name", help="name shown in Jupyter "
                   "(default 'Python 3 (mpipub, N engines)')")
    i.add_argument("--mpiexec", metavar="LAUNCHER", help="launcher command, e.g. "
                   "'srun --mpi=pmi2' or a path to mpiexec (default: the mpiexec next to this "
                   "Python, else on PATH)")
    where = i.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for this user only")
    where.add_argument("--sys-prefix", action="store_true",
                       help=f"install into this Python's prefix ({sys.prefix})")
    where.add_argument("--prefix", metavar="PATH", help="install into PATH/share/jupyter")
    i.set_defaults(func=_cmd_install)
    ls = ksub.add_parser("list", help="list installed mpipub kernels")
    ls.set_defaults(func=_cmd_list)
    rm = ksub.add_parser("remove", help="remove an mpipub kernel")
    rm.add_argument("name")
    rm.set_defaults(func=_cmd_remove)


def _fail(exc: KernelSpecError) -> int:
    sys.stderr.write(f"mpipub kernel: {exc}\n")
    return 2


def _cmd_install(args) -> int:
    try:
        engines = int(args.engines)
    except ValueError:
        return _fail(KernelSpecError(f"--engines must be a positive integer, got "
                                     f"{args.engines!r}"))
    prefix = sys.prefix if args.sys_prefix else args.prefix
    try:
        where = install(engines, args.name, args.display_name, args.mpiexec, user=args.user,
                        prefix=prefix)
    except KernelSpecError as exc:
        return _fail(exc)
    with open(os.path.join(where, "kernel.json")) as f:
        spec = json.load(f)
    print(f"installed kernel {os.path.basename(where)!r} ({spec['display_name']}) in {where}")
    return 0


def _cmd_list(args) -> int:
    try:
        specs = mpipub_specs()
    except KernelSpecError as exc:
        return _fail(exc)
    if not specs:
        print("no mpipub kernels installed (mpipub kernel install --engines N)")
        return 0
    width = max(len(n) for n in specs)
    for name, (where, spec) in sorted(specs.items()):
        meta = spec.get("metadata", {}).get("mpipub", {})
        print(f"{name:<{width}}  {meta.get('engines', '?')} engines  "
              f"launcher: {meta.get('launcher', spec['argv'][0])}  {where}")
    return 0


def _cmd_remove(args) -> int:
    try:
        where = remove(args.name)
    except KernelSpecError as exc:
        return _fail(exc)
    print(f"removed kernel {args.name!r} ({where})")
    return 0
