"""``mpipub.plot.live(source, key)``: one figure that redraws as steps arrive, until the end.

``source`` is an ``AsyncResult`` (data straight from the engines) or a sink file opened with
``mpipub.open(path)`` (one another job is still writing, or a finished one): both go through
the same loop, which reads the newest step, draws it and waits. In Jupyter the figure is one
display that is updated in place; elsewhere it is a PNG file rewritten in place (written to a
temporary name and renamed, so a viewer never reads half a file).

What is drawn depends on the key's values: numbers become a time series per engine, 1-D
arrays one line per engine, 2-D arrays (and higher, flattened after the first axis) one image
panel per engine. Figures are made with matplotlib's Agg canvas, never with pyplot, so the
notebook's inline backend does not show a second copy at the end of the cell.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from typing import Any

#: Seconds between redraws (the wait between frames; drawing takes its own time on top).
DEFAULT_INTERVAL_S = 1.0


class _TaskSource:
    """An AsyncResult: the latest data, ``data_at`` and, for time series, the history."""

    def __init__(self, ar):
        self.ar = ar
        self.engines = list(ar.engine_ids)
        self._seen_batches = 0  # batches of the history already read for time series
        self._series: dict[int, tuple[list, list]] = {e: ([], []) for e in self.engines}

    def done(self) -> bool:
        return self.ar.ready()

    def pause(self, seconds: float) -> None:
        self.ar.wait(seconds)  # (returns early when the task ends)

    def last_steps(self) -> dict[int, int | None]:
        return {e: s.last_step for e, s in self.ar.stats.items()}

    def latest(self, key: str) -> dict[int, Any]:
        data = self.ar.data
        data = [data] if isinstance(data, dict) else data
        return {e: d.get(key) for e, d in zip(self.engines, data)}

    def at(self, step: int, key: str) -> dict[int, Any]:
        data = self.ar.data_at(step)
        data = [data] if not isinstance(data, list) else data
        return {e: (d or {}).get(key) for e, d in zip(self.engines, data)}

    def series(self, key: str) -> dict[int, tuple[list, list]]:
        rec = self.ar._rec
        with rec.cond:
            first = rec.history_first
            start = max(self._seen_batches, first)
            batches = list(rec.history)[start - first:]
            self._seen_batches = first + len(rec.history)
        for b in batches:
            steps, values = self._series[b.engine]
            for step, _t, d, _n in b.publications():
                if key in d:
                    steps.append(step)
                    values.append(d[key])
        return self._series


class _RunSource:
    """A sink file (``mpipub.open``): re-read at every frame, so a file being written works."""

    def __init__(self, run):
        self.run = run
        self.task_id = None
        self.engines: list[int] = []

    def _task(self):
        self.run.refresh()
        if not self.run.tasks:
            return None
        t = self.run.task(self.task_id)
        self.task_id = t.task_id
        self.engines = list(t.engines)
        return t

    def done(self) -> bool:
        t = self._task()
        return self.run.closed_cleanly or (t is not None and not math.isnan(t.end))

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def last_steps(self) -> dict[int, int | None]:
        t = self._task()
        if t is None:
            return {}
        return {e: (int(t.engine(e).steps[-1]) if len(t.engine(e).steps) else None)
                for e in t.engines}

    def latest(self, key: str) -> dict[int, Any]:
        t = self._task()
        out = {}
        for e in (t.engines if t is not None else []):
            ed = t.engine(e)
            s = ed.last_step((key,)) if key in ed.keys else None
            out[e] = None if s is None else ed.value_at((key,), s)
        return out

    def at(self, step: int, key: str) -> dict[int, Any]:
        t = self._task()
        if t is None:
            return {}
        return {e: (d or {}).get(key) for e, d in zip(t.engines, t.data_at(step))}

    def series(self, key: str) -> dict[int, tuple[list, list]]:
        t = self._task()
        if t is None or key not in t.keys:
            return {}
        return {e: (list(st), list(v) if v is not None else [])
                for e, st, v in zip(t.engines, t.steps(key), t[key])}


def _adapt(source):
    from .client.asyncresult import AsyncResult
    from .sink.reader import Run

    if isinstance(source, AsyncResult):
        return _TaskSource(source)
    if isinstance(source, Run):
        return _RunSource(source)
    raise TypeError(f"mpipub.plot.live: source must be an AsyncResult or a sink file opened "
                    f"with mpipub.open(path), not {type(source).__name__}")


def _numeric(key: str, engine: int, value):
    import numpy as np

    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"mpipub.plot.live: key {key!r} on engine {engine} holds "
                        f"{type(value).__name__} values ({arr.dtype}); only numbers and numeric "
                        "arrays can be plotted")
    return arr


def _ndim(value) -> int:
    import numpy as np

    return np.ndim(value)


def _step_label(steps: list) -> str:
    known = sorted({s for s in steps if s is not None})
    if not known:
        return "no step yet"
    if len(known) == 1:
        return f"step {known[0]}"
    return f"steps {known[0]}-{known[-1]}"


def render(key: str, frame: dict[int, Any], series: dict[int, tuple[list, list]] | None,
           title: str, dpi: int = 80) -> bytes:
    """PNG of one frame: ``frame`` maps engine -> value (None: nothing yet)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = {e: _numeric(key, e, v) for e, v in frame.items() if v is not None}
    ndim = max((v.ndim for v in values.values()), default=0)
    if series is not None and values and ndim == 0:  # scalars: a time series per engine
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        for e, (steps, vals) in series.items():
            if steps:
                ax.plot(steps, np.asarray(vals, dtype=float), label=f"engine: {e}")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.legend(loc="best")
    elif ndim <= 1:
        fig = Figure(figsize=(7, 4))
        ax = fig.add_subplot()
        for e, v in values.items():
            ax.plot(np.atleast_1d(v), label=f"engine: {e}")
        ax.set_ylabel(key)
        if values:
            ax.legend(loc="best")
        else:
            ax.text(0.5, 0.5, f"waiting for {key!r}", ha="center", transform=ax.transAxes)
    else:  # images: one panel per engine
        n = len(values)
        fig = Figure(figsize=(min(4 * n, 16), 4))
        for i, (e, v) in enumerate(values.items()):
            ax = fig.add_subplot(1, n, i + 1)
            img = v.reshape(v.shape[0], -1) if v.ndim > 2 else np.atleast_2d(v)
            im = ax.imshow(img, aspect="auto")
            fig.colorbar(im, ax=ax)
            ax.set_title(f"engine: {e}")
    fig.suptitle(title)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


class _Display:
    """Where frames go: one updated display in Jupyter, else a PNG file rewritten in place."""

    def __init__(self, png: str | os.PathLike | None, key: str):
        self.handle = None
        self.path = None
        self.notebook = png is None and _in_kernel()
        if not self.notebook:
            self.path = os.fspath(png) if png is not None else \
                f"live_{key.replace('/', '_')}.png"

    def show(self, data: bytes) -> None:
        if self.notebook:
            from IPython.display import Image, display

            if self.handle is None:
                self.handle = display(Image(data=data, format="png"), display_id=True)
            else:
                self.handle.update(Image(data=data, format="png"))
            return
        where = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".live-", suffix=".png", dir=where)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def live(source, key: str, *, interval: float = DEFAULT_INTERVAL_S, aligned: bool = False,
         timeout: float | None = None, png: str | os.PathLike | None = None,
         dpi: int = 80) -> str | None:
    """Plot ``key`` of ``source`` (an AsyncResult or ``mpipub.open(path)``) as it changes,
    redrawing at most every ``interval`` seconds, until the task is done (or ``timeout``).

    ``aligned=True`` draws, for every engine, the newest step that all engines have reached
    (a domain-decomposed field never shows tiles from different steps). In Jupyter the figure
    is one display updated in place; elsewhere (or with ``png=PATH``) it is a PNG file
    rewritten in place, whose path is returned. Interrupting (Ctrl-C, "interrupt kernel")
    stops the plot, not the task."""
    if not isinstance(key, str):
        raise TypeError(f"mpipub.plot.live: key must be a str, not {type(key).__name__}")
    src = _adapt(source)
    out = _Display(png, key)
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = None
    while True:
        done = src.done()  # read before the data, so the last frame holds the last step
        last = src.last_steps()
        if aligned:
            steps = [s for s in last.values()]
            step = None if (not steps or None in steps) else min(steps)
            frame = src.at(step, key) if step is not None else {}
            label = f"{key}: step {step} (all engines)" if step is not None else \
                f"{key}: waiting for every engine"
            state = ("aligned", step)
        else:
            frame = src.latest(key)
            label = f"{key}: {_step_label(list(last.values()))}"
            state = ("latest", tuple(sorted(last.items(), key=lambda kv: kv[0])))
        if state != shown or done:
            scalars = any(v is not None and _ndim(v) == 0 for v in frame.values())
            series = src.series(key) if scalars else None
            out.show(render(key, frame, series, label + (" (done)" if done else ""), dpi=dpi))
            shown = state
        if done:
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        src.pause(interval if deadline is None else
                  max(0.0, min(interval, deadline - time.monotonic())))
    return out.path
