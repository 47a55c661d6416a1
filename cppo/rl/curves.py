"""curves.png: a run's reward, accuracy (training and held-out), CPL and entropy against the step,
drawn from metrics.jsonl.

    plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    draw_curves(run_dir)        # the trainer's call at the end: a write that fails is a warning

The figure is drawn once, at the end, from what the files cppo.rl.logfiles writes as the run goes
hold.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from cppo.rl.atomic import atomic_write
from cppo.rl.logfiles import METRICS_FILE, read_metrics, write_failure

CURVES_FILE = "curves.png"

# (title, left-axis key, right-axis key or None): one panel each, 2x2.
PANELS = [
    ("reward", "reward/total", None),
    ("accuracy", "reward/accuracy", None),
    ("CPL", "cpl/loss", "cpl/mask_frac"),
    ("entropy", "entropy/mean", None),
]
# drawn over a panel's left axis as points joined by a line, unsmoothed: the evaluations (step 0 first)
OVERLAYS = {"accuracy": ("eval/accuracy", "held-out (eval/accuracy)")}


def _series(rows: list[dict], key: str):
    """(steps, values) for the rows that carry `key` as a number (NaN kept as a gap)."""
    import numpy as np

    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
    if not pts:
        return None
    steps, values = zip(*sorted(pts))
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def moving_average(values, window: int):
    """Centred mean over `window` points (fewer at the ends) at each point, NaNs ignored."""
    import numpy as np

    finite = np.isfinite(values)
    csum = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(finite)])
    idx = np.arange(len(values))
    lo = np.maximum(idx - window // 2, 0)
    hi = np.minimum(idx + (window - 1) // 2 + 1, len(values))
    count = ccnt[hi] - ccnt[lo]
    return np.where(count > 0, (csum[hi] - csum[lo]) / np.maximum(count, 1), np.nan)


def plot_curves(metrics_path: Path, out_png: Path) -> Path:
    """A 2x2 figure of reward, accuracy, CPL (loss, and mask fraction on a twin axis) and entropy; the
    held-out evaluations (eval/accuracy, with step 0's before training) over the training accuracy.

    Raw values are drawn faint with a centred moving average (window ~ 1/10 of the run, at most 25
    steps) over them. A key the run did not log (a GRPO run has no `cpl/*`) leaves its panel with a
    note. The PNG is written to a temporary file and renamed into place.
    """
    metrics_path, out_png = Path(metrics_path), Path(out_png)
    fig = curves_figure(read_metrics(metrics_path), metrics_path.parent.name or str(metrics_path))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return out_png


def curves_figure(rows: list[dict], title: str):
    """The matplotlib Figure that plot_curves saves, from metrics.jsonl's rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global state, no GUI backend
    axes = fig.subplots(2, 2).ravel()
    for ax, (title, key, twin_key) in zip(axes, PANELS):
        ax.set_title(title)
        ax.set_xlabel("step")
        drawn = False
        for k, axis, color in ((key, ax, "C0"), (twin_key, None, "C1")):
            series = _series(rows, k) if k else None
            if series is None:
                continue
            if axis is None:
                axis = ax.twinx()
            steps, values = series
            window = max(1, min(25, math.ceil(len(values) / 10)))
            axis.plot(steps, values, color=color, alpha=0.3, linewidth=1)
            axis.plot(steps, moving_average(values, window), color=color, linewidth=2, label=k)
            axis.set_ylabel(k, color=color)
            drawn = True
        overlay = OVERLAYS.get(title)
        if overlay and (series := _series(rows, overlay[0])) is not None:
            ax.plot(*series, color="C2", marker="o", linewidth=2, label=overlay[1])
            ax.legend(loc="lower right", fontsize="small")
            drawn = True
        if not drawn:
            missing = key + (f", {twin_key}" if twin_key else "")
            ax.text(
                0.5,
                0.5,
                f"not logged in this run\n({missing})",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="gray",
            )
    fig.suptitle(title)
    return fig


def draw_curves(run_dir: Path) -> Path | None:
    """curves.png of a finished run from its metrics.jsonl; None, with a stderr line, when it cannot
    be written (a full disk): the run's logs and checkpoints are complete, the figure can be drawn
    again later with `plot_curves`."""
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        return None
    try:
        return plot_curves(run_dir / METRICS_FILE, run_dir / CURVES_FILE)
    except Exception as e:  # OSError, or whatever matplotlib's writer raises on a full disk
        print(
            f"[cppo] could not write {run_dir / CURVES_FILE} ({write_failure(e)}); the run's "
            "logs and checkpoints are complete: draw it later with cppo.rl.curves.plot_curves",
            file=sys.stderr,
        )
        return None
