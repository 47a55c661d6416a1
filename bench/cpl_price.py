"""CPPO's price over GRPO, the way users pay it: the no-argument `cppo-train` step against `--algo grpo`.

    python bench/cpl_price.py --steps 6 --repeats 2        # about 8 minutes on 2 cores, quiet machine
    python bench/cpl_price.py --variants grpo "cppo" "cppo --cpl-rows 1.0" "cppo --cpl-rows 0.25"

Each variant is one `cppo-train --max-steps STEPS --seed 0` subprocess (no evaluation, no trackers),
the variants run in turn and the whole round `--repeats` times, so that a drift of the machine's load
falls on every variant alike. Reported per variant: the median time/step over steps 2..STEPS of all
its runs (step 1 includes warm-up), the median of each phase (time/*), the highest memory/peak_mb,
and the ratio of each to the first variant's (GRPO by default). Results: docs/benchmarks.md.
`cppo` alone is the no-argument run, with whatever defaults it has today.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ["grpo", "cppo", "cppo --cpl-rows 1.0"]


def run_variant(variant: str, steps: int) -> list[dict]:
    """The metrics lines of steps >= 1 of one run of `variant` ('grpo' or 'cppo', then any flags)."""
    algo, *flags = shlex.split(variant)
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "cli.train", "--algo", algo, "--max-steps", str(steps), "--seed", "0"]
        cmd += ["--output-dir", out, "--eval-every", "0", "--eval-at-start", "false", "--report-to", "none"]
        subprocess.run(cmd + flags, cwd=REPO, check=True, capture_output=True, env=dict(os.environ))
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row.get("step", 0) >= 1]


def summarize(rows: list[dict]) -> dict[str, float]:
    """Median time/* over steps >= 2 (warm-up left out) and the highest peak memory of `rows`."""
    timed = [r for r in rows if r["step"] >= 2]
    keys = sorted({k for r in timed for k in r if k.startswith("time/")})
    out = {k: statistics.median(r[k] for r in timed if k in r) for k in keys}
    out["memory/peak_mb"] = max(r.get("memory/peak_mb", 0.0) for r in rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--out", default=None, help="write every run's metrics and the summary as JSON")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = defaultdict(list)
    for round_ in range(args.repeats):
        for variant in args.variants:
            rows = run_variant(variant, args.steps)
            runs[variant] += rows
            step = statistics.median(r["time/step"] for r in rows if r["step"] >= 2)
            print(f"round {round_ + 1}: {variant}: {step:.2f} s/step", flush=True)
    summary = {v: summarize(rows) for v, rows in runs.items()}
    base = summary[args.variants[0]]
    phases = [k for k in ("time/rollout", "time/reward", "time/update") if k in base]
    head = " | ".join(p[5:] for p in phases)
    print(f"\n| variant | s/step | x {args.variants[0]} | {head} | peak MB |")
    print("|---|---|---|" + "---|" * len(phases) + "---|")
    for variant, s in summary.items():
        cells = " | ".join(f"{s.get(p, float('nan')):.2f}" for p in phases)
        ratio = s["time/step"] / base["time/step"]
        print(f"| {variant} | {s['time/step']:.2f} | {ratio:.2f}x | {cells} | {s['memory/peak_mb']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
