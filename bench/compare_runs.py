"""Runs of several `bench/compare_algos.py` outputs side by side: avg@K with 95 % CIs, paired by seed.

    python bench/compare_runs.py runs/compare27/summary.json:grpo=grpo runs/compare27/summary.json:cppo=cppo \
        docs/evidence/compare-summary.json:cppo=cppo-full

Each argument is SUMMARY.json:ALGO=LABEL (the runs of ALGO in that summary, shown as LABEL). The
start model's line is the first summary's. Every pair of labels gets its difference paired by
training seed (the seeds both have), mean and 95 % CI (Student's t), and whether that interval holds
0. The summaries must come from the same settings (steps, eval items, samples, evaluation seeds):
the script refuses to mix others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from itertools import combinations
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_algos import mean_ci  # noqa: E402  (bench/ is not a package)

SAME = ("steps", "eval_n", "samples", "eval_seeds", "max_new_tokens", "model")


def load(spec: str) -> tuple[str, dict, dict[int, dict]]:
    """(label, the summary's args, seed -> run) of one SUMMARY.json:ALGO=LABEL argument."""
    path, _, pick = spec.rpartition(":")
    algo, _, label = pick.partition("=")
    summary = json.loads(Path(path).read_text())
    runs = {r["seed"]: r for r in summary["runs"] if r["algo"] == algo}
    if not runs:
        raise SystemExit(f"{path}: no runs of algo {algo!r}")
    return label or algo, summary, runs


def fmt(xs: list[float]) -> str:
    m, h = mean_ci(xs)
    return f"{100 * m:.1f} ± {100 * h:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="SUMMARY.json:ALGO=LABEL")
    args = p.parse_args(argv)
    loaded = [load(s) for s in args.runs]
    first = loaded[0][1]["args"]
    for label, summary, _ in loaded:
        differ = [k for k in SAME if summary["args"].get(k) != first.get(k)]
        if differ:
            raise SystemExit(f"{label}: settings differ from the first summary's in {differ}")
    K = first["samples"]
    before = loaded[0][1]["before"]
    print(f"| model | avg@{K} at T=1 (%) | greedy (%) | median s/step | runs |")
    print("|---|---|---|---|---|")
    start = [100 * before[kind]["accuracy"] for kind in ("sampled", "greedy")]
    print(f"| start | {start[0]:.1f} | {start[1]:.1f} | – | – |")
    for label, _, runs in loaded:
        rs = list(runs.values())
        step = statistics.median(r["step_s"] for r in rs)
        sampled = fmt([r["after"]["sampled"]["accuracy"] for r in rs])
        greedy = fmt([r["after"]["greedy"]["accuracy"] for r in rs])
        print(f"| {label} | {sampled} | {greedy} | {step:.2f} | {len(rs)} |")
    print(f"\nPaired by training seed, avg@{K} (points):\n")
    print("| difference | per seed | mean ± 95 % CI | CI holds 0 |")
    print("|---|---|---|---|")
    for (a, _, ra), (b, _, rb) in combinations(loaded, 2):
        seeds = sorted(set(ra) & set(rb))
        diff = [rb[s]["after"]["sampled"]["accuracy"] - ra[s]["after"]["sampled"]["accuracy"] for s in seeds]
        m, h = mean_ci(diff)
        each = ", ".join(f"{100 * d:+.1f}" for d in diff)
        print(f"| {b} − {a} | {each} | {100 * m:+.1f} ± {100 * h:.1f} | {'yes' if abs(m) <= h else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
