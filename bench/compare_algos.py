"""GRPO against CPPO on the shapes task from the bundled demo model: equal steps, several seeds.

    python bench/compare_algos.py --seeds 0 1 2 3 4 --steps 40 --eval-n 200 --samples 4 --jobs 2 \
        --max-new-tokens 96 --out runs/compare

For each (algo, seed) it trains with `cppo-train`'s loop (`run_training`), then measures on the
first --eval-n test items, with the training grader (`cppo.models.evaluate`): avg@K at the
rollout temperature 1.0 (the mean over the --eval-seeds sampling seeds) and greedy accuracy. The
starting model is measured the same way once. Runs go --jobs at a time, each in its own process
with 2 / jobs torch threads (on a 2-core machine two 1-thread runs finish sooner than two 2-thread
runs one after the other, and the per-step times stay comparable between algorithms because both
run under the same load).

Writes under --out: `summary.json` (every number, per run), `results.md` (the tables that
docs/results.md quotes: mean and 95 % confidence interval over seeds, Student's t), and
`curves.png` (the step reward against the step and against the wall-clock seconds of training,
mean over seeds).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from cppo.models import demo_model_path, load_model_and_processor
from cppo.models.evaluate import evaluate
from cppo.rl.data import open_dataset, shapes_data
from cppo.rl.logfiles import read_metrics
from cppo.rl.sources import find_split

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _eval(model, processor, test, args) -> dict:
    """avg@K at temperature 1.0 (averaged over the --eval-seeds draws) and greedy accuracy on the
    first eval_n test items. One draw of avg@4 on 200 items swings by up to 4 points with its seed
    on the demo model, more than a step of RL moves it, so the sampled number is a mean of draws."""
    out = {}
    for name, samples in (("sampled", args.samples), ("greedy", 1)):
        reports = [
            evaluate(
                model,
                processor,
                test,
                samples=samples,
                temperature=1.0 if samples > 1 else None,
                max_new_tokens=args.max_new_tokens,
                limit=args.eval_n,
                seed=seed,
            )
            for seed in (args.eval_seeds if samples > 1 else args.eval_seeds[:1])
        ]
        types = reports[0].get("per_type", {})
        out[name] = {
            "accuracy": statistics.mean(r["accuracy"] for r in reports),
            "format": statistics.mean(r["format"] for r in reports),
            "per_type": {k: statistics.mean(r["per_type"][k]["accuracy"] for r in reports) for k in types},
            "draws": [r["accuracy"] for r in reports],
        }
    return out


def _one_run(algo: str, seed: int, data: str, args: argparse.Namespace, threads: int) -> dict:
    """Train one (algo, seed) and evaluate the result; runs in a worker process."""
    from cppo.rl.flags import parse_args
    from cppo.rl.loop import run_training

    torch.set_num_threads(threads)
    run_dir = Path(args.out) / f"{algo}-s{seed}"
    flags = [
        *("--algo", algo, "--seed", str(seed), "--max-steps", str(args.steps), "--data", data),
        *("--output-dir", str(run_dir), "--overwrite", "--no-tensorboard"),
        *("--max-new-tokens", str(args.max_new_tokens)),
        *(["--model", args.model] if args.model else []),
        *args.train_args.split(),
    ]
    t0 = time.perf_counter()
    run_dir, trained = run_training(parse_args(flags))
    wall = time.perf_counter() - t0
    metrics = read_metrics(run_dir / "metrics.jsonl")
    processor = load_model_and_processor(args.model or demo_model_path())[1]
    test = open_dataset(find_split(Path(data), "test"))
    return {
        "algo": algo,
        "seed": seed,
        "wall_s": wall,
        "step_s": statistics.median(m["time/step"] for m in metrics),
        "reward": [m["reward/total"] for m in metrics],
        "step_seconds": [m["time/step"] for m in metrics],
        "after": _eval(trained, processor, test, args),
    }


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student's t; 0 for one value)."""
    m = statistics.mean(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, T_975.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))


def _fmt(xs: list[float]) -> str:
    m, h = mean_ci(xs)
    return f"{100 * m:.1f}" if len(xs) == 1 else f"{100 * m:.1f} ± {100 * h:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="starting checkpoint (default: the bundled demo model)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--algos", nargs="+", default=["grpo", "cppo"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument(
        "--eval-seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="sampling seeds of the avg@K draws"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, each with 2 / jobs torch threads")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--train-args", default="", help="extra cppo-train flags for every run, as one string")
    args = p.parse_args(argv)
    threads = max(1, 2 // args.jobs)
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = shapes_data(out / "shapes", seed=0)
    test = open_dataset(find_split(data, "test"))
    model, processor = load_model_and_processor(args.model or demo_model_path())
    summary = {"before": _eval(model, processor, test, args), "runs": [], "args": vars(args)}
    print(f"[compare] before: {summary['before']}", flush=True)
    jobs = [(algo, seed) for seed in args.seeds for algo in args.algos]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_one_run, a, s, str(data), args, threads) for a, s in jobs]
        for f in futures:
            run = f.result()
            summary["runs"].append(run)
            after = run["after"]
            print(
                f"[compare] {run['algo']} seed {run['seed']}: avg@{args.samples} "
                f"{after['sampled']['accuracy']:.3f}, greedy {after['greedy']['accuracy']:.3f}, "
                f"{run['step_s']:.2f} s/step",
                flush=True,
            )
            (out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_markdown(summary, out)
    _plot(summary, out / "curves.png")
    return 0


def write_markdown(summary: dict, out: Path) -> None:
    a = summary["args"]
    before = summary["before"]
    lines = [
        f"Test split, first {a['eval_n']} items; {a['steps']} steps; seeds {a['seeds']}; "
        "mean ± 95 % confidence interval over seeds.",
        "",
        f"| model | avg@{a['samples']} at T=1 (%) | greedy (%) | format (%) | median s/step | runs |",
        "|---|---|---|---|---|---|",
        f"| start | {_fmt([before['sampled']['accuracy']])} | {_fmt([before['greedy']['accuracy']])} | "
        f"{_fmt([before['sampled']['format']])} | – | – |",
    ]
    for algo in a["algos"]:
        runs = [r for r in summary["runs"] if r["algo"] == algo]
        if runs:
            lines.append(
                f"| {algo} | {_fmt([r['after']['sampled']['accuracy'] for r in runs])} | "
                f"{_fmt([r['after']['greedy']['accuracy'] for r in runs])} | "
                f"{_fmt([r['after']['sampled']['format'] for r in runs])} | "
                f"{statistics.median(r['step_s'] for r in runs):.2f} | {len(runs)} |"
            )
    algos = [x for x in a["algos"] if any(r["algo"] == x for r in summary["runs"])]
    if len(algos) == 2:
        by_seed = {x: {r["seed"]: r for r in summary["runs"] if r["algo"] == x} for x in algos}
        seeds = sorted(set(by_seed[algos[0]]) & set(by_seed[algos[1]]))
        diff = [
            by_seed[algos[1]][s]["after"]["sampled"]["accuracy"]
            - by_seed[algos[0]][s]["after"]["sampled"]["accuracy"]
            for s in seeds
        ]
        if len(diff) > 1:
            lines += [
                "",
                f"{algos[1]} − {algos[0]}, avg@{a['samples']}, paired by seed: {_fmt(diff)} points.",
            ]
    types = sorted(before["sampled"]["per_type"])
    if types:
        lines += [
            "",
            f"avg@{a['samples']} per question type (%), mean over seeds:",
            "",
            "| model | " + " | ".join(types) + " |",
            "|---|" + "---|" * len(types),
            "| start | " + " | ".join(f"{100 * before['sampled']['per_type'][t]:.1f}" for t in types) + " |",
        ]
        for algo in a["algos"]:
            runs = [r for r in summary["runs"] if r["algo"] == algo]
            if runs:
                cells = [
                    f"{100 * statistics.mean(r['after']['sampled']['per_type'].get(t, 0) for r in runs):.1f}"
                    for t in types
                ]
                lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for algo in summary["args"]["algos"]:
        runs = [r for r in summary["runs"] if r["algo"] == algo]
        if not runs:
            continue
        n = min(len(r["reward"]) for r in runs)
        mean = [statistics.mean(r["reward"][i] for r in runs) for i in range(n)]
        clock = [statistics.mean(sum(r["step_seconds"][: i + 1]) for r in runs) for i in range(n)]
        label = f"{algo} (mean of {len(runs)} seeds)"
        by_step.plot(range(1, n + 1), mean, label=label)
        by_time.plot(clock, mean, label=label)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training seconds (mean over seeds)")
    by_step.set_ylabel("mean reward of the step's rollouts")
    by_step.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
