"""``mpipub info | plot | watch`` on sink files (see docs/sink.md)."""

from __future__ import annotations

import functools
import os
import sys
import time


def add_commands(sub) -> None:
    i = sub.add_parser("info", help="tasks, engines, keys, dtypes, shapes, steps and times of "
                       "a sink file")
    i.add_argument("path")
    i.set_defaults(func=_guarded("info", cmd_info))
    p = sub.add_parser("plot", help="plot one key of a sink file to an image")
    p.add_argument("path")
    p.add_argument("--key", required=True, help="key to plot (nested: a/b)")
    p.add_argument("--step", type=int, default=None,
                   help="step to plot (default: each engine's latest)")
    p.add_argument("--task", type=int, default=None, help="task id (default: the latest)")
    p.add_argument("-o", "--output", default=None, help="image file (default: KEY.png)")
    p.set_defaults(func=_guarded("plot", cmd_plot))
    w = sub.add_parser("watch", help="live view of a sink file another job is writing")
    w.add_argument("path")
    w.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    w.add_argument("--timeout", type=float, default=None,
                   help="stop after this many seconds (default: when the run ends)")
    w.set_defaults(func=_guarded("watch", cmd_watch))


def _guarded(cmd: str, fn):
    """``fn`` with its failures as one line on stderr: a damaged file (``SinkFileError``,
    met while reading, not only at open) exits 1; a closed pipe (``mpipub info F | head``)
    exits 141 like a command killed by SIGPIPE, without a traceback."""

    @functools.wraps(fn)
    def run(args) -> int:
        from .reader import SinkFileError

        try:
            rc = fn(args)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
            return rc
        except BrokenPipeError:
            # Python flushes stdout again at exit: point it at /dev/null so that this
            # flush cannot fail (what the Python docs advise for SIGPIPE)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return 141
        except SinkFileError as exc:
            return _err(cmd, exc)

    return run


def _err(cmd: str, msg) -> int:
    sys.stderr.write(f"mpipub {cmd}: {msg}\n")
    return 1


def _open(path):
    from .reader import Run

    return Run(path)


def _fmt_t(t: float) -> str:
    if t != t:  # NaN
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def _describe_leaf(ed, path) -> str:
    parts = []
    for lf in ed.leaves[path]:
        n = len(lf.steps())
        ds = lf.dataset()
        dt = "str" if lf.kind == "str" else "bytes" if lf.kind == "bytes" else str(ds.dtype)
        parts.append(f"{dt}{tuple(ds.shape[1:])} {lf.kind} x{n}")
    return "; ".join(parts)


def _info_lines(run, path) -> list[str]:
    import numpy as np

    a = run.attrs
    state = "closed" if run.closed_cleanly else "open or interrupted"
    lines = [f"{path}: mpipub sink format {a.get('mpipub_format')}, created "
             f"{_fmt_t(float(a.get('created', np.nan)))}, {state}, {len(run.tasks)} tasks"]
    for tid in run.tasks:
        t = run.task(tid)
        lines.append(f"task {tid}: {t.label} function={t.function} args={t.args} "
                     f"kwargs={t.kwargs}")
        lines.append(f"  start {_fmt_t(t.start)}  end {_fmt_t(t.end)}")
        if t.cut_short is not None:
            lines.append(f"  cut short: {t.cut_short}")
        for e in t.engines:
            ed = t.engine(e)
            n = len(ed.steps)
            span = (f"steps {int(ed.steps[0])}..{int(ed.steps[-1])}, times "
                    f"{_fmt_t(ed.times[0])} .. {_fmt_t(ed.times[-1])}") if n else "no steps"
            lines.append(f"  engine {e} ({ed.host}): {n} publications, {span}")
        if t.engines:
            ed = t.engine(t.engines[0])
            lines.append(f"  keys (engine {t.engines[0]}):")
            for key in ed.leaves:
                lines.append(f"    {'/'.join(key)}: {_describe_leaf(ed, key)}")
    return lines


def cmd_info(args) -> int:
    try:
        run = _open(args.path)
    except Exception as exc:  # noqa: BLE001 - one line, no traceback
        return _err("info", exc)
    with run:
        # one consistent reading, retried whole on a fresh open where a live writer tears it
        # (a damaged file: one line, from _guarded)
        lines = run._reading(lambda: _info_lines(run, args.path))
    print("\n".join(lines))
    return 0


def cmd_plot(args) -> int:
    import numpy as np

    try:
        run = _open(args.path)
        t = run.task(args.task)
    except KeyError as exc:
        return _err("plot", exc.args[0])
    except Exception as exc:  # noqa: BLE001
        return _err("plot", exc)
    with run:
        try:
            series = t[args.key]
        except KeyError as exc:
            return _err("plot", exc.args[0])
        steps = t.steps(args.key)
        out = args.output or f"{args.key.replace('/', '_')}.png"
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        vals = {}
        for e, st, s in zip(t.engines, steps, series):
            if s is None or not len(st):
                continue
            if args.step is None:
                i = len(st) - 1
            else:
                hits = np.nonzero(st == args.step)[0]
                if not len(hits):
                    continue
                i = int(hits[0])
            vals[e] = (st, s, i)
        if not vals:
            return _err("plot", f"key {args.key!r} has no step {args.step} in task {t.task_id}")
        first = next(iter(vals.values()))
        v0 = np.asarray(first[1][first[2]]) if not isinstance(first[1][first[2]], dict) else None
        if v0 is None or v0.dtype.kind not in "biuf":
            return _err("plot", f"key {args.key!r} is not numeric; cannot plot it")
        try:
            if v0.ndim == 0:  # a scalar per step: its history, one line per engine
                fig, ax = plt.subplots(figsize=(7, 4))
                for e, (st, s, _) in vals.items():
                    ax.plot(st, np.asarray(s, dtype=float), label=f"engine {e}")
                ax.set_xlabel("step")
                ax.set_ylabel(args.key)
                ax.legend()
            elif v0.ndim == 1:
                fig, ax = plt.subplots(figsize=(7, 4))
                for e, (st, s, i) in vals.items():
                    ax.plot(np.asarray(s[i]), label=f"engine {e} step {int(st[i])}")
                ax.set_ylabel(args.key)
                ax.legend()
            else:
                n = len(vals)
                fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False)
                for ax, (e, (st, s, i)) in zip(axes[0], vals.items()):
                    img = np.asarray(s[i])
                    img = img.reshape(img.shape[0], -1) if img.ndim > 2 else img
                    im = ax.imshow(img, aspect="auto")
                    fig.colorbar(im, ax=ax)
                    ax.set_title(f"engine {e} step {int(st[i])}")
            fig.suptitle(f"{args.key} (task {t.task_id})")
            fig.savefig(out, dpi=80)
            plt.close(fig)
        except OSError as exc:
            return _err("plot", f"cannot write {out}: {exc}")
    print(out)
    return 0


def cmd_watch(args) -> int:
    from .reader import Run

    t_start = time.monotonic()
    last: dict = {}
    run = None
    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                run = Run(args.path) if run is None else run.refresh()
            except Exception as exc:  # noqa: BLE001
                return _err("watch", exc)
            now = time.time()
            lines = [f"{args.path}  {time.strftime('%H:%M:%S')}"]
            if not run.tasks:
                lines.append("  (no tasks yet)")
            for tid in run.tasks[-3:]:
                t = run.task(tid)
                state = "done" if t.end == t.end else "running"
                lines.append(f"task {tid} {t.label} [{state}]")
                for e in t.engines:
                    ed = t.engine(e)
                    n = len(ed.steps)
                    prev = last.get((tid, e))
                    rate = (n - prev[0]) / max(1e-9, now - prev[1]) if prev else 0.0
                    last[(tid, e)] = (n, now)
                    age = f"{now - ed.times[-1]:.1f} s ago" if n else "-"
                    lines.append(f"  engine {e:>3}: {n:>8} steps  {rate:8.1f} steps/s  "
                                 f"last step {int(ed.steps[-1]) if n else '-'} {age}")
            done = run.closed_cleanly
            if done:
                lines.append("run ended (file closed)")
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            if done:
                return 0
            if args.timeout is not None and time.monotonic() - t_start > args.timeout:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 130
    finally:
        if run is not None:
            run.close()
