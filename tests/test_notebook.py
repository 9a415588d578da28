"""The mpipub Jupyter kernel: real kernels under real mpiexec, driven by jupyter_client.

Every kernel is installed into a temporary prefix with ``mpipub kernel install``, started by a
jupyter_client KernelManager (as Jupyter starts it), and, whatever happens, ends killed with
every process of its job (mpiexec, hydra's proxy and the ranks, which hydra puts in sessions of
their own, found as mpiexec's descendants).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MPIEXEC, PYTHON, ROOT
from mpipub import launcher

jupyter_client = pytest.importorskip("jupyter_client")
psutil = pytest.importorskip("psutil")
pytest.importorskip("ipykernel")

from jupyter_client import KernelManager  # noqa: E402
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402

from mpipub.notebook import ports  # noqa: E402

ENGINES = 2
START_TIMEOUT_S = 90  # a kernel is ready within this (a slow shared machine)
CELL_TIMEOUT_S = 60
GONE_TIMEOUT_S = 20  # after shutdown, every process of the job is gone within this


def mpipub_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "mpipub", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A prefix holding an mpipub kernelspec with ENGINES engines (named "mpipub-test")."""
    prefix = tmp_path_factory.mktemp("prefix")
    r = mpipub_cli("kernel", "install", "--engines", str(ENGINES), "--name", "mpipub-test",
                   "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    return prefix / "share" / "jupyter" / "kernels"


def job_processes(root: int) -> list:
    try:
        p = psutil.Process(root)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(procs: list) -> list:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(procs: list, timeout: float = GONE_TIMEOUT_S) -> list:
    """Wait until none of ``procs`` runs; return those still running at the deadline."""
    deadline = time.monotonic() + timeout
    left = alive(procs)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = alive(procs)
    return left


class Kernel:
    """A started kernel, its client and every process of its job."""

    def __init__(self, kernel_dir: Path, tmp: Path, name: str = "mpipub-test"):
        self.procs: list = []
        self.tmp = tmp
        self.kc = None
        self.stderr = None
        # Open MPI 5's mpiexec does not start where a killed job left a session folder with
        # its pid (it exits at once and the kernel never answers: the CI flake of session 7).
        # A kernelspec runs mpiexec itself, not through mpipub.launcher, so clear them here.
        launcher.clear_stale_openmpi_sessions()
        self._start(kernel_dir, name)
        self.remember()

    def _start(self, kernel_dir: Path, name: str) -> None:
        """Start the kernel, on ports its MPI job cannot take (mpipub.notebook.ports), and
        wait until it answers. Its stderr goes to a file, shown when it dies."""
        ksm = KernelSpecManager(kernel_dirs=[str(kernel_dir)])
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("MPLBACKEND", None)
        self.km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
        ports.pin(self.km)
        self.km.shutdown_wait_time = 10.0
        log = self.tmp / "kernel.stderr"
        # (kept open: restart_kernel() starts the new job with the same arguments)
        self.stderr = open(log, "w")  # noqa: SIM115 - closed in close()
        self.km.start_kernel(env=env, cwd=str(ROOT), stderr=self.stderr)
        self.kc = self.km.client()
        self.kc.start_channels()
        try:
            self.kc.wait_for_ready(timeout=START_TIMEOUT_S)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; the kernel's stderr:\n{log.read_text()}") from None

    def _close_stderr(self) -> None:
        if self.stderr is not None:
            self.stderr.close()
            self.stderr = None

    def remember(self) -> None:
        """Record the job's processes (mpiexec and its descendants), for the checks."""
        self.procs = job_processes(self.km.provisioner.process.pid)

    def rank0(self):
        """The kernel's own process (rank 0), as the kernel reports it."""
        pid = self.execute("import os; print(os.getpid())")[1]["stdout"].strip()
        return psutil.Process(int(pid))

    def execute(self, code: str, timeout: float = CELL_TIMEOUT_S) -> tuple[dict, dict]:
        """Run a cell; return (reply content, {"stdout": ..., "stderr": ..., "msgs": [...]})."""
        out = {"stdout": "", "stderr": "", "msgs": []}

        def hook(msg):
            out["msgs"].append(msg)
            if msg["msg_type"] == "stream":
                out[msg["content"]["name"]] += msg["content"]["text"]

        # (stop_on_error=False: ipykernel would abort a request queued right after an error)
        reply = self.kc.execute_interactive(code, timeout=timeout, output_hook=hook,
                                            stop_on_error=False)
        return reply["content"], out

    def ok(self, code: str, timeout: float = CELL_TIMEOUT_S) -> dict:
        content, out = self.execute(code, timeout)
        assert content["status"] == "ok", (content, out)
        return out

    def interrupt(self) -> None:
        """"interrupt kernel" (message mode) and wait for the kernel's reply (by then it has
        signalled itself)."""
        msg = self.kc.session.msg("interrupt_request", {})
        self.kc.control_channel.send(msg)
        deadline = time.monotonic() + CELL_TIMEOUT_S
        while True:
            reply = self.kc.control_channel.get_msg(timeout=max(0.1, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                assert reply["content"]["status"] == "ok", reply["content"]
                return

    def close(self) -> None:
        """Shut down (now), then kill whatever of the job is still alive."""
        if self.kc is not None:
            self.kc.stop_channels()
        try:
            if self.km.has_kernel:
                self.km.shutdown_kernel(now=True)
        except Exception:  # noqa: BLE001 - cleaning up: kill below
            pass
        for p in alive(self.procs):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self._close_stderr()


@pytest.fixture
def kernel(kernel_dir, tmp_path):
    k = Kernel(kernel_dir, tmp_path)
    try:
        yield k
    finally:
        k.close()


# -- kernelspecs ---------------------------------------------------------------------------------
def test_install_list_remove(tmp_path):
    prefix = tmp_path / "p"
    r = mpipub_cli("kernel", "install", "--engines", "3", "--prefix", str(prefix))
    assert r.returncode == 0, r.stderr
    spec_file = prefix / "share" / "jupyter" / "kernels" / "mpipub-3" / "kernel.json"
    spec = json.loads(spec_file.read_text())
    assert spec["interrupt_mode"] == "message"
    assert spec["display_name"] == "Python 3 (mpipub, 3 engines)"
    argv = spec["argv"]
    assert os.path.isabs(argv[0]) and os.path.basename(argv[0]) == "mpiexec"
    assert argv[argv.index("-n") + 1] == "4"
    assert argv[-5:] == [sys.executable, "-m", "mpipub.notebook.kernel", "-f",
                         "{connection_file}"]
    env = {"JUPYTER_PATH": str(prefix / "share" / "jupyter")}
    r = mpipub_cli("kernel", "list", env=env)
    assert r.returncode == 0 and "mpipub-3" in r.stdout and "3 engines" in r.stdout, r.stdout
    assert MPIEXEC is None or "mpiexec" in r.stdout
    r = mpipub_cli("kernel", "remove", "mpipub-3", env=env)
    assert r.returncode == 0, r.stderr
    assert not spec_file.exists()
    r = mpipub_cli("kernel", "remove", "mpipub-3", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "mpipub-3" in r.stderr


def test_install_srun_launcher_and_name(tmp_path):
    fake = tmp_path / "bin" / "srun"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    r = mpipub_cli("kernel", "install", "--engines", "16", "--name", "big", "--mpiexec",
                   f"{fake} --mpi=pmi2", "--prefix", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    spec = json.loads((tmp_path / "p/share/jupyter/kernels/big/kernel.json").read_text())
    assert spec["argv"][:4] == [str(fake), "--mpi=pmi2", "-n", "17"]
    assert "--oversubscribe" not in spec["argv"]
    assert spec["display_name"] == "Python 3 (mpipub, 16 engines)"


@pytest.mark.parametrize("args, words", [
    (["--engines", "0"], ["--engines", "positive integer"]),
    (["--engines", "four"], ["--engines", "four"]),
    (["--mpiexec", "/no/such/mpiexec"], ["--mpiexec", "/no/such/mpiexec"]),
])
def test_install_errors_are_one_line(tmp_path, args, words):
    r = mpipub_cli("kernel", "install", *args, "--prefix", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("mpipub kernel: "), r.stderr
    for w in words:
        assert w in r.stderr


def test_install_without_mpiexec_is_one_line(tmp_path):
    """No mpiexec next to the Python nor on PATH: one line that says what to do."""
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "python").symlink_to(sys.executable)
    r = subprocess.run([str(bindir / "python"), "-c",
                        "import sys; from mpipub.cli import main; sys.exit(main())",
                        "kernel", "install", "--prefix", str(tmp_path)],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": str(bindir), "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1 and "no mpiexec found" in r.stderr, r.stderr


# -- the kernel ----------------------------------------------------------------------------------
SLOW_TASK = """
import time
from mpipub import Client
c = Client()
def slow(n):
    import time
    from mpipub import publish_data
    print("started", flush=True)
    for i in range(n):
        publish_data({"i": i})
        time.sleep(0.05)
    return n
ar = c[:].apply_async(slow, 100000)
"""


@pytest.mark.timeout(180)
def test_kernel_client_output_errors_and_shutdown(kernel):
    out = kernel.ok("from mpipub import Client\nc = Client()\nprint(c.ids, Client().ids)")
    assert out["stdout"] == f"{list(range(1, ENGINES + 1))} {list(range(1, ENGINES + 1))}\n"
    # closing a client in a cell leaves the kernel's engines serving
    kernel.ok("Client().close(); c.close()")
    out = kernel.ok("print(Client()[:].apply_sync(lambda: 7))")
    assert out["stdout"] == "[7, 7]\n"
    # engine output reaches the cell that started the task, prefixed by rank, while it runs:
    # the task waits for a file that this test writes only once it has seen the output
    flag = kernel.tmp / "go"
    msg_id = kernel.kc.execute(f"""
def talk(flag):
    import os, time
    print("first", flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.02)
    print("second", flush=True)
    return os.path.exists(flag)
print(c[:].apply_sync(talk, {str(flag)!r}))
""")
    seen = ""
    deadline = time.monotonic() + CELL_TIMEOUT_S
    while not all(f"[stdout:{e}] first\n" in seen for e in range(1, ENGINES + 1)):
        assert time.monotonic() < deadline, seen
        msg = kernel.kc.get_iopub_msg(timeout=CELL_TIMEOUT_S)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            seen += msg["content"]["text"]
    flag.write_text("")
    reply = kernel.kc.get_shell_msg(timeout=CELL_TIMEOUT_S)
    assert reply["content"]["status"] == "ok", reply["content"]
    while True:
        msg = kernel.kc.get_iopub_msg(timeout=CELL_TIMEOUT_S)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            seen += msg["content"]["text"]
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    for e in range(1, ENGINES + 1):
        assert f"[stdout:{e}] second\n" in seen, seen
    assert "[True, True]\n" in seen
    # a remote error: rank, host, exception and the remote traceback, readably
    content, out = kernel.execute("def boom(x):\n    return 1 / x\n\nc[1].apply_sync(boom, 0)")
    assert content["status"] == "error" and content["ename"] == "RemoteError"
    errors = [m["content"] for m in out["msgs"] if m["msg_type"] == "error"]
    text = "\n".join(errors[0]["traceback"])
    assert "engine 1 on" in text and "ZeroDivisionError: division by zero" in text
    assert "in boom" in text and "return 1 / x" in text, text  # the cell's source line
    assert "Traceback (most recent call last)" in text
    # a client with a sink: close() closes (and finishes) its file, the engines keep serving
    sink = kernel.tmp / "cell.h5"
    out = kernel.ok(f"""
import mpipub
cs = Client(sink={str(sink)!r})
def pub():
    from mpipub import publish_data
    publish_data({{"x": 1.0}})
cs[:].apply_sync(pub)
cs.close()
print(mpipub.open({str(sink)!r}).closed_cleanly, c[:].apply_sync(lambda: 3))
""")
    assert out["stdout"] == "True [3, 3]\n", out
    # shutdown leaves no process of the job behind
    procs = job_processes(kernel.km.provisioner.process.pid)
    assert len(procs) >= ENGINES + 2, procs  # mpiexec, (proxy), the ranks
    t0 = time.monotonic()
    kernel.km.shutdown_kernel()
    took = time.monotonic() - t0
    assert wait_gone(procs) == []
    assert took < 8, f"shutdown with idle engines took {took:.1f} s"


@pytest.mark.timeout(180)
def test_px_magics(kernel):
    out = kernel.ok("%px import os\n%px x = os.getpid()\n%px print('pid', x)")
    lines = sorted(ln for ln in out["stdout"].splitlines() if "pid" in ln)
    assert len(lines) == ENGINES and lines[0].startswith("[stdout:1] pid "), out
    out = kernel.ok("%%px --targets 2\nprint('only', x)\n")
    assert out["stdout"].startswith("[stdout:2] only ") and "[stdout:1]" not in out["stdout"]
    content, out = kernel.execute("%%px\nraise ValueError('bad value here')\n")
    assert content["status"] == "error" and content["ename"] == "CompositeError"
    text = "\n".join(next(m["content"]["traceback"] for m in out["msgs"]
                          if m["msg_type"] == "error"))
    assert "[engine 1 on" in text and "[engine 2 on" in text
    assert "ValueError: bad value here" in text
    out = kernel.ok("ar = get_ipython().run_cell_magic('px', '--noblock', 'y = 5')\n"
                    "print(type(ar).__name__, ar.get())")
    assert out["stdout"] == "AsyncResult [None, None]\n"
    out = kernel.ok("%px --targets 1,2 print(y)")
    assert "[stdout:1] 5" in out["stdout"] and "[stdout:2] 5" in out["stdout"]


WAITS = {
    "get": "ar.get()",
    "wait": "ar.wait()",
    "wait_interactive": "ar.wait_interactive()",
    "stream": "for pub in ar.stream():\n    pass",
    "live plot": "mpipub.plot.live(ar, 'i', interval=0.2)",
}
# imported before the waiting cell: an interrupt that lands inside the first import of numpy
# leaves it half-initialised for the rest of the process (any Python program, not mpipub's)
WAIT_SETUP = ("import mpipub.plot, numpy, matplotlib.figure, matplotlib.backends.backend_agg, "
              "IPython.display")


def interrupt_cell(kernel: Kernel, waiting_code: str, interrupts: int = 1) -> tuple[dict, list]:
    """Start SLOW_TASK, then a cell that waits with ``waiting_code``; interrupt once that cell
    says it is about to wait; return the reply and the messages."""
    kernel.ok(WAIT_SETUP + "\n" + SLOW_TASK + "\nar.wait(timeout=0.2)")
    msg_id = kernel.kc.execute("print('waiting', flush=True)\n" + waiting_code,
                               stop_on_error=False)
    msgs = []
    deadline = time.monotonic() + CELL_TIMEOUT_S
    while True:  # the cell runs and is about to wait
        assert time.monotonic() < deadline, msgs
        msg = kernel.kc.get_iopub_msg(timeout=CELL_TIMEOUT_S)
        msgs.append(msg)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream" and \
                "waiting" in msg["content"]["text"]:
            break
    for _ in range(interrupts):
        kernel.interrupt()
    reply = kernel.kc.get_shell_msg(timeout=CELL_TIMEOUT_S)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kernel.kc.get_shell_msg(timeout=CELL_TIMEOUT_S)
    return reply["content"], msgs


@pytest.mark.timeout(240)
def test_interrupt_each_wait_keeps_engines(kernel):
    for name, code in WAITS.items():
        content, _ = interrupt_cell(kernel, code)
        assert content["status"] == "error" and content["ename"] == "KeyboardInterrupt", \
            (name, content)
        assert "keeps running" in content["evalue"] and "ar.abort()" in content["evalue"], \
            (name, content)
        out = kernel.ok("print(ar.ready())")  # the task was not stopped by the interrupt
        assert out["stdout"] == "False\n", name
        kernel.ok("ar.abort()\ntry:\n    ar.get(timeout=30)\nexcept Exception as e:\n"
                  "    print(type(e).__name__)")
        out = kernel.ok("print(c[:].apply_sync(lambda: 'next'))")  # engines serve the next
        assert out["stdout"] == "['next', 'next']\n", name


@pytest.mark.timeout(240)
def test_double_interrupt_and_idle_interrupts_do_no_harm(kernel):
    content, _ = interrupt_cell(kernel, "ar.get()", interrupts=3)
    assert content["ename"] == "KeyboardInterrupt"
    for _ in range(3):  # interrupting an idle kernel
        kernel.interrupt()
    kernel.ok("ar.abort()\ntry:\n    ar.get(timeout=30)\nexcept Exception:\n    pass")
    out = kernel.ok("print(c[:].apply_sync(lambda: 'alive'))")
    assert out["stdout"] == "['alive', 'alive']\n"
    assert len(alive(kernel.procs)) == len(kernel.procs)


@pytest.mark.timeout(240)
def test_restart_and_shutdown_with_busy_engine(kernel):
    busy = ("from mpipub import Client\nc = Client()\n"
            "def forever():\n    import time\n    while True:\n        time.sleep(0.1)\n"
            "ar = c[1].apply_async(forever)\n")
    kernel.ok(busy + "ar.wait(0.5)")
    old = alive(kernel.procs)
    kernel.km.restart_kernel()  # graceful: the busy engine cannot be aborted; the job ends
    assert wait_gone(old) == []
    kernel.kc.wait_for_ready(timeout=START_TIMEOUT_S)
    kernel.remember()
    out = kernel.ok("from mpipub import Client\nprint(Client()[:].apply_sync(lambda: 1))")
    assert out["stdout"] == "[1, 1]\n"
    kernel.ok(busy)
    procs = alive(kernel.procs)
    t0 = time.monotonic()
    kernel.km.shutdown_kernel(now=True)
    assert wait_gone(procs) == []
    assert time.monotonic() - t0 < GONE_TIMEOUT_S


@pytest.mark.timeout(180)
def test_idle_kernel_does_not_spin(kernel):
    """Rank 0 with a client and no task outstanding: a generous bound that catches a thread
    that polls hard (the I/O thread's 0.5 ms poll cost ~5%; a spin costs ~100%)."""
    kernel.ok("from mpipub import Client\nc = Client()\nprint(c[:].apply_sync(lambda: 1))")
    rank0 = kernel.rank0()
    before = rank0.cpu_times()
    t0 = time.monotonic()
    time.sleep(3.0)  # a measurement window, not synchronisation
    after = rank0.cpu_times()
    cpu = (after.user + after.system - before.user - before.system) / (time.monotonic() - t0)
    assert cpu < 0.03, f"an idle kernel's rank 0 uses {cpu:.1%} of a core"
    out = kernel.ok("print(c[:].apply_sync(lambda: 2))")  # and the next task still starts
    assert out["stdout"] == "[2, 2]\n"


def test_kernel_module_on_engines_does_not_import_ipykernel(tmp_path):
    """Engine ranks of the kernel's job never import ipykernel (start-up cost per rank)."""
    from conftest import run_mpi

    script = tmp_path / "probe.py"
    script.write_text(
        "import sys\nfrom mpipub.transport import comm\nw = comm.world()\n"
        "if w.rank:\n"
        "    import mpipub.notebook.kernel as k\n"
        "    print('rank', w.rank, 'ipykernel' in sys.modules, flush=True)\n"
        "w.comm.Barrier()\n")
    job = run_mpi(3, [str(script)], timeout=60)
    assert job.returncode == 0, job.output
    assert job.stdout.count("False") == 2, job.output


def test_kernel_that_cannot_start_says_why(tmp_path):
    """A kernel whose port is taken (jupyter_client picks the ports, the kernel binds them a
    moment later, and another process can take one in between) ends, with the reason on its
    stderr, and its engines end with it: before, it died without a word."""
    import socket

    from conftest import run_mpi

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        chosen = [taken.getsockname()[1], *ports.outside_ephemeral(4)]
        names = ["shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"]
        conn = tmp_path / "kernel.json"
        conn.write_text(json.dumps({**dict(zip(names, chosen)), "ip": "127.0.0.1",
                                    "transport": "tcp", "key": "k",
                                    "signature_scheme": "hmac-sha256"}))
        job = run_mpi(1 + ENGINES, ["-m", "mpipub.notebook.kernel", "-f", str(conn)],
                      timeout=120)
    finally:
        taken.close()
    assert job.returncode != 0, job.output
    assert "mpipub kernel: rank 0 failed, so the kernel ends" in job.stderr, job.output
    assert "Address already in use" in job.stderr, job.output
    assert "a port of the connection file was taken" in job.stderr, job.output


@pytest.mark.timeout(180)
def test_live_plot_updates_one_display(kernel):
    content, out = kernel.execute("""
import mpipub
from mpipub import Client
c = Client()
def sim(n):
    import time, numpy as np
    from mpipub import publish_data
    for i in range(n):
        publish_data({"a": np.random.rand(20), "i": i})
        time.sleep(0.05)
ar = c[:].apply_async(sim, 40)
mpipub.plot.live(ar, "a", interval=0.3)
print("done", ar.ready())
""")
    assert content["status"] == "ok", content
    assert out["stdout"].endswith("done True\n")
    shown = [m for m in out["msgs"] if m["msg_type"] == "display_data"]
    updates = [m for m in out["msgs"] if m["msg_type"] == "update_display_data"]
    assert len(shown) == 1, [m["msg_type"] for m in out["msgs"]]  # one figure, no pyplot copy
    display_id = shown[0]["content"]["transient"]["display_id"]
    assert "image/png" in shown[0]["content"]["data"]
    assert updates, "the figure was never updated in place"
    for m in updates:
        assert m["content"]["transient"]["display_id"] == display_id
        assert "image/png" in m["content"]["data"]


@pytest.mark.timeout(300)
def test_example_notebook_end_to_end(kernel_dir, tmp_path):
    """examples/datapub.ipynb, committed with its outputs cleared, runs on an mpipub kernel:
    the published dicts, a plot of the latest data, a live plot and a %%px cell."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client import AsyncKernelManager
    from jupyter_client.utils import run_sync

    nb = nbformat.read(ROOT / "examples" / "datapub.ipynb", as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code_cells)
    ksm = KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    km = AsyncKernelManager(kernel_name="mpipub-test", kernel_spec_manager=ksm)
    ports.pin(km)
    client = nbclient.NotebookClient(nb, km=km, timeout=120, startup_timeout=START_TIMEOUT_S,
                                     resources={"metadata": {"path": str(tmp_path)}})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MPLBACKEND", None)
    procs: list = []
    try:
        client.execute(env=env)
        procs = job_processes(km.provisioner.process.pid)
        assert len(procs) >= ENGINES + 2
        run_sync(km.shutdown_kernel)()
        assert wait_gone(procs) == []
    finally:
        for p in alive(procs):
            p.kill()
        if km.has_kernel:
            run_sync(km.shutdown_kernel)(now=True)

    def outputs(marker: str) -> list:
        cell = next(c for c in code_cells if marker in c.source)
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.outputs
        return cell.outputs

    hi = outputs("publish_hi")
    assert any(o.output_type == "execute_result" and
               o.data["text/plain"] == repr([{"a": "hi"}] * ENGINES) for o in hi), hi
    for marker in ("plt.plot", "mpipub.plot.live"):
        assert any(o.output_type == "display_data" and "image/png" in o.data
                   for o in outputs(marker)), marker
    px = "".join(o.get("text", "") for o in outputs("%%px"))
    for e in range(1, ENGINES + 1):
        assert f"[stdout:{e}] engine {e} pid" in px, px
