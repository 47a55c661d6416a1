"""GRPO against CPPO on the shapes task from the bundled demo model: equal steps, several seeds.

    python bench/compare_algos.py --seeds 0 1 2 --steps 40 --eval-n 200 --samples 4 --out runs/compare

For each (algo, seed) it trains with `cppo-train`'s loop, then measures avg@K accuracy and format
on the test split with the training grader (`cppo.models.evaluate`). The starting model is measured
once. Writes `summary.json`, `curves.png` (reward per step, mean over seeds) and `results.md` (the
table that docs/results.md quotes) under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from cppo.models import demo_model_path, load_model_and_processor
from cppo.models.evaluate import evaluate
from cppo.rl.config import TrainConfig
from cppo.rl.data import find_split, open_dataset, shapes_data
from cppo.rl.logfiles import read_metrics
from cppo.rl.loop import run_training


def _eval(model, processor, test, args) -> dict:
    r = evaluate(
        model,
        processor,
        test,
        samples=args.samples,
        temperature=1.0 if args.samples > 1 else None,
        max_new_tokens=args.max_new_tokens,
        limit=args.eval_n,
        seed=1234,
    )
    return {
        "accuracy": r["accuracy"],
        "format": r["format"],
        "per_type": {k: v["accuracy"] for k, v in r.get("per_type", {}).items()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--algos", nargs="+", default=["grpo", "cppo"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--train-args", default="", help="extra cppo-train flags for every run, as one string")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = shapes_data(out / "shapes", seed=0)
    test = open_dataset(find_split(data, "test"))
    model, processor = load_model_and_processor(demo_model_path())
    summary = {"before": _eval(model, processor, test, args), "runs": [], "args": vars(args)}
    print(f"[compare] before: {summary['before']}")
    from cppo.rl.config import parse_args

    for seed in args.seeds:
        for algo in args.algos:
            flags = [
                "--algo",
                algo,
                "--seed",
                str(seed),
                "--max-steps",
                str(args.steps),
                "--data",
                str(data),
                "--output-dir",
                str(out / f"{algo}-s{seed}"),
                "--no-tensorboard",
                "--max-new-tokens",
                str(args.max_new_tokens),
                *args.train_args.split(),
            ]
            cfg: TrainConfig = parse_args(flags)
            t0 = time.perf_counter()
            run_dir, trained = run_training(cfg)
            wall = time.perf_counter() - t0
            metrics = read_metrics(run_dir / "metrics.jsonl")
            after = _eval(trained, processor, test, args)
            run = {
                "algo": algo,
                "seed": seed,
                "wall_s": wall,
                "step_s": statistics.median(m["time/step"] for m in metrics),
                "reward": [m["reward/total"] for m in metrics],
                "after": after,
            }
            summary["runs"].append(run)
            print(f"[compare] {algo} seed {seed}: after {after}, {run['step_s']:.2f} s/step")
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
    _write_markdown(summary, out)
    _plot(summary, out / "curves.png")
    return 0


def _mean_sd(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.mean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"


def _write_markdown(summary: dict, out: Path) -> None:
    a = summary["args"]
    lines = [
        f"Test split, first {a['eval_n']} items, avg@{a['samples']} (temperature 1.0), "
        f"{a['steps']} steps, seeds {a['seeds']}.",
        "",
        "| model | accuracy (%) | format (%) | median s/step | runs |",
        "|---|---|---|---|---|",
        f"| demo model (start) | {_mean_sd([summary['before']['accuracy']])} | "
        f"{_mean_sd([summary['before']['format']])} | – | – |",
    ]
    for algo in a["algos"]:
        runs = [r for r in summary["runs"] if r["algo"] == algo]
        if not runs:
            continue
        lines.append(
            f"| {algo} | {_mean_sd([r['after']['accuracy'] for r in runs])} | "
            f"{_mean_sd([r['after']['format'] for r in runs])} | "
            f"{statistics.median(r['step_s'] for r in runs):.2f} | {len(runs)} |"
        )
    types = sorted(summary["before"]["per_type"])
    if types:
        lines += [
            "",
            "Accuracy per question type (%), mean over seeds:",
            "",
            "| model | " + " | ".join(types) + " |",
            "|---|" + "---|" * len(types),
        ]
        lines.append(
            "| start | " + " | ".join(f"{100 * summary['before']['per_type'][t]:.1f}" for t in types) + " |"
        )
        for algo in a["algos"]:
            runs = [r for r in summary["runs"] if r["algo"] == algo]
            if runs:
                cells = [
                    f"{100 * statistics.mean(r['after']['per_type'].get(t, 0) for r in runs):.1f}"
                    for t in types
                ]
                lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for algo in summary["args"]["algos"]:
        runs = [r["reward"] for r in summary["runs"] if r["algo"] == algo]
        if runs:
            n = min(len(r) for r in runs)
            mean = [statistics.mean(r[i] for r in runs) for i in range(n)]
            ax.plot(range(1, n + 1), mean, label=f"{algo} (mean of {len(runs)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of the step's rollouts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
