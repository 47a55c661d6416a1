"""What a run writes as it goes: metrics.jsonl, rollouts.jsonl, reward_errors.jsonl, TensorBoard
scalars, curves.png.

    log = RunLogger(run_dir, tensorboard=cfg.tensorboard, is_main=rank == 0)
    log.truncate_after(resumed_step)           # on resume: drop lines from after the checkpoint
    for step in ...:
        log.log(step, metrics)                 # one JSON line, flushed and fsynced
        log.log_rollouts(step, rows)           # a sample of rollouts, one JSON object each
        log.log_reward_errors(step, errors)    # each reward that raised or gave NaN, with its sample
    log.close()
    plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")

The logger is a no-op on non-zero ranks (`is_main=False`), so the loop never branches on logging.
Each call opens the file in append mode, writes one whole line, flushes, fsyncs and closes it: a
crash loses at most the line being written, and `truncate_after` can swap the file underneath
without a stale handle. A torn last line (a kill mid-write) is cut off when the logger starts, and
`read_metrics` skips it. NaN and inf are written as JSON's usual extensions (`NaN`, `Infinity`),
which Python's `json` reads back: a bad step is logged, not hidden.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from cppo.rl.atomic import atomic_write, fsync_dir

METRICS_FILE = "metrics.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
REWARD_ERRORS_FILE = "reward_errors.jsonl"


def _plain(value):
    """A JSON-ready value: tensors and numpy scalars to Python numbers, arrays to lists, else str."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _append_lines(path: Path, lines: list[str]) -> None:
    data = "".join(line + "\n" for line in lines).encode()
    with open(path, "ab") as f:  # one write of whole lines
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a write killed midway), so the next append starts clean."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _rewrite_keeping(path: Path, max_step: int) -> None:
    """Atomically rewrite a JSONL file with only the lines whose step is <= max_step."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8") as f:
        kept = [
            line for line in f if line.endswith("\n") and (s := _step_of(line)) is not None and s <= max_step
        ]
    atomic_write(path, "".join(kept))


class RunLogger:
    """Metrics and rollout samples of one run, on the main process only (else every method does nothing)."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, is_main: bool = True):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.metrics_path = self.run_dir / METRICS_FILE
        self.rollouts_path = self.run_dir / ROLLOUTS_FILE
        self.reward_errors_path = self.run_dir / REWARD_ERRORS_FILE
        self._tb = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for path in self._jsonl_paths:
            _cut_torn_tail(path)
        if tensorboard:
            self._tb = self._open_tensorboard(purge_step=None)

    @property
    def _jsonl_paths(self) -> tuple[Path, ...]:
        return (self.metrics_path, self.rollouts_path, self.reward_errors_path)

    def _open_tensorboard(self, purge_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: scalars go to metrics.jsonl only
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append `{"step": step, **metrics}` to metrics.jsonl (flushed, fsynced) and to TensorBoard."""
        if not self.is_main:
            return
        row = {"step": int(step), **{str(k): _plain(v) for k, v in metrics.items()}}
        _append_lines(self.metrics_path, [json.dumps(row)])
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, int(step))
            self._tb.flush()

    def log_rollouts(self, step: int, rows: list[dict]) -> None:
        """Append one JSON object per rollout (`step` first, then the row's keys) to rollouts.jsonl."""
        if not self.is_main or not rows:
            return
        lines = [json.dumps({"step": int(step), **_plain(row)}, ensure_ascii=False) for row in rows]
        _append_lines(self.rollouts_path, lines)

    def log_reward_errors(self, step: int, rows: list[dict]) -> None:
        """Append one JSON object per failed reward call (reward name, error, response, sample) to
        reward_errors.jsonl; nothing is created while no reward fails."""
        if not self.is_main or not rows:
            return
        lines = [json.dumps({"step": int(step), **_plain(row)}, ensure_ascii=False) for row in rows]
        _append_lines(self.reward_errors_path, lines)

    def truncate_after(self, step: int) -> None:
        """Keep only lines with step <= `step` in metrics.jsonl, rollouts.jsonl and reward_errors.jsonl
        (on resume).

        Each file is rewritten to a temporary file, fsynced and renamed over the old one, so a crash
        here leaves either the old or the new file. TensorBoard events after `step` are purged too.
        """
        if not self.is_main:
            return
        for path in self._jsonl_paths:
            _rewrite_keeping(path, int(step))
        if self._tb is not None:
            self._tb.close()
            self._tb = self._open_tensorboard(purge_step=int(step) + 1)

    def set_aside_earlier_logs(self) -> list[tuple[str, str]]:
        """For a run that starts at step 0 in a folder holding an earlier run's logs (say, one killed
        before its first checkpoint): rename each non-empty log to ``NAME.earlier-K.jsonl`` (the
        first free K) instead of appending to it, and drop the earlier TensorBoard events. Returns
        the (old, new) names moved."""
        if not self.is_main:
            return []
        moved = []
        for path in self._jsonl_paths:
            if not path.is_file() or path.stat().st_size == 0:
                continue
            k = 1
            while (target := path.with_name(f"{path.stem}.earlier-{k}{path.suffix}")).exists():
                k += 1
            os.replace(path, target)
            moved.append((path.name, target.name))
        if moved:
            fsync_dir(self.run_dir)
            if self._tb is not None:
                self._tb.close()
                self._tb = self._open_tensorboard(purge_step=1)
        return moved

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path) -> list[dict]:
    """The rows of a metrics.jsonl, in file order; a torn or unparseable last line is skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # a write cut short by a kill
            raise ValueError(f"{path}:{i + 1}: not a JSON line: {line[:80]!r}") from None
    return rows


# (title, left-axis key, right-axis key or None): one panel each, 2x2.
PANELS = [
    ("reward", "reward/total", None),
    ("accuracy", "reward/accuracy", None),
    ("CPL", "cpl/loss", "cpl/mask_frac"),
    ("entropy", "entropy/mean", None),
]


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
    """A 2x2 figure of reward, accuracy, CPL (loss, and mask fraction on a twin axis) and entropy.

    Raw values are drawn faint with a centred moving average (window ~ 1/10 of the run, at most 25
    steps) over them. A key the run did not log (a GRPO run has no `cpl/*`) leaves its panel with a
    note. The PNG is written to a temporary file and renamed into place.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics_path, out_png = Path(metrics_path), Path(out_png)
    rows = read_metrics(metrics_path)
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
    fig.suptitle(metrics_path.parent.name or str(metrics_path))
    out_png.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return out_png
