"""What a finished run achieved, in a few printed lines and in summary.json beside its logs.

    summary = write_summary(run_dir, cfg)         # summary.json (atomic), from metrics.jsonl
    print(summary_text(summary))                  # the lines cppo-train prints at the end

Reward and accuracy at the start and the end are means over the first and the last few steps (one
step's 16 prompts swing by about ±0.1); the held-out evaluation (eval/*) is read at its first and last
step, step 0 being the evaluation before training. The next commands name the final checkpoint.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from cppo.rl.atomic import atomic_write
from cppo.rl.checkpoint import latest_checkpoint
from cppo.rl.logfiles import METRICS_FILE, read_metrics

SUMMARY_FILE = "summary.json"
WINDOW = 5  # steps averaged at each end (fewer in a short run: at most half of them)


def _ends(rows: list[dict], key: str) -> dict | None:
    """{"start", "end", "steps"}: the mean of `key` over the first and the last `steps` training steps."""
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    if not values:
        return None
    k = max(1, min(WINDOW, len(values) // 2))
    return {"start": statistics.fmean(values[:k]), "end": statistics.fmean(values[-k:]), "steps": k}


def summarize(run_dir: Path, cfg) -> dict:
    """The run's summary from its metrics.jsonl and checkpoints (see the module docstring)."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    rows = read_metrics(path) if path.is_file() else []
    steps = [r for r in rows if r.get("step", 0) >= 1 and "reward/total" in r]  # training steps
    evals = [r for r in rows if isinstance(r.get("eval/accuracy"), (int, float))]
    times = [r["time/step"] for r in steps if isinstance(r.get("time/step"), (int, float))]
    memory = [r["memory/peak_mb"] for r in steps if isinstance(r.get("memory/peak_mb"), (int, float))]
    ckpt = latest_checkpoint(run_dir)
    summary = {
        "steps": max((r["step"] for r in steps), default=0),
        "max_steps": cfg.max_steps,
        "reward": _ends(steps, "reward/total"),
        "accuracy": _ends(steps, "reward/accuracy"),
        "eval": None,
        "seconds_per_step": statistics.median(times) if times else None,
        "peak_memory_mb": max(memory) if memory else None,
        "checkpoint": str(ckpt) if ckpt else None,
        "next": [],
    }
    if evals:
        first, last = evals[0], evals[-1]
        summary["eval"] = {
            "metric": f"avg@{cfg.eval_samples}" if cfg.eval_samples > 1 else "greedy accuracy",
            "start": {"step": first["step"], "accuracy": first["eval/accuracy"]},
            "end": {"step": last["step"], "accuracy": last["eval/accuracy"]},
            "curve": [[r["step"], r["eval/accuracy"]] for r in evals],
        }
    if ckpt:
        data = cfg.data or f"{run_dir / 'shapes'} --split test"  # the demo's generated task
        summary["next"] = [
            f"cppo-eval --model {ckpt} --data {data} --samples 4 --limit 200",
            f"cppo-detect --model {ckpt}",
        ]
    return summary


def write_summary(run_dir: Path, cfg) -> dict:
    """summarize(), written to run_dir/summary.json whole (cppo.rl.atomic); returns it."""
    summary = summarize(run_dir, cfg)
    atomic_write(Path(run_dir) / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    return summary


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def summary_text(summary: dict) -> str:
    """The printed summary: a few lines (cppo-train's last line then says where to look)."""
    lines = [f"[cppo] summary: {summary['steps']} of {summary['max_steps']} steps"]
    for name in ("reward", "accuracy"):
        if e := summary[name]:
            fmt = _pct if name == "accuracy" else "{:.3f}".format
            lines.append(
                f"  training {name} (mean of {e['steps']} steps): {fmt(e['start'])} -> {fmt(e['end'])}"
            )
    if e := summary["eval"]:
        lines.append(
            f"  held-out {e['metric']}: {_pct(e['start']['accuracy'])} at step {e['start']['step']} -> "
            f"{_pct(e['end']['accuracy'])} at step {e['end']['step']}"
        )
    timing = []
    if summary["seconds_per_step"] is not None:
        timing.append(f"{summary['seconds_per_step']:.1f} s/step (median)")
    if summary["peak_memory_mb"] is not None:
        timing.append(f"peak memory {summary['peak_memory_mb']:.0f} MiB")
    if timing:
        lines.append("  " + ", ".join(timing))
    if summary["checkpoint"]:
        lines.append(f"  final checkpoint: {summary['checkpoint']}")
    lines += [f"  next: {cmd}" for cmd in summary["next"]]
    return "\n".join(lines)
