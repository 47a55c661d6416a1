"""Perception under views of trained checkpoints against the start model, paired by training seed.

    python bench/perception_evidence.py --runs runs/compare --n 200 --eval-seeds 1 2 3 \
        --views paper --draws 2 --out runs/perception            # after bench/compare_algos.py

Each run directory (a folder named ``<algo>-s<seed>`` or ``<algo>-seed<seed>``, as
bench/compare_algos.py writes them; a folder that holds such folders is searched one level down)
is scored at its last complete checkpoint (``checkpoints/step-*``: every run keeps its last one), or
as a model folder itself when it holds a ``config.json``; ``--start`` (default: the bundled demo
model) is scored the same way. Scoring is ``cppo.detect.views_eval.evaluate_views`` on the first
``--n`` items of the test split of ``--data`` (default: the shapes data compare_algos generates, seed
0), once per ``--eval-seeds`` seed (it seeds the views and the sampling), and a model's number is
the mean over those seeds.

Writes under ``--out``: ``summary.json`` (every number per model and per evaluation seed) and
``results.md``: per algorithm the mean and 95 % confidence interval over training seeds (Student's
t) of clean accuracy, robustness (accuracy under I+), consistency, accuracy under I- and under a
blank image, reliance (clean - I-) and the entropy shift; then the differences paired by seed
(each pair of algorithms, each algorithm against the start model); then the means per question type.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_algos import mean_ci  # noqa: E402  (bench/ is not a package)

RUN_NAME = re.compile(r"^(?P<algo>[A-Za-z0-9_]+?)-s(?:eed)?(?P<seed>\d+)$")
METRICS = ("clean", "robustness", "consistency", "removing", "blank", "reliance", "entropy_shift")
HEADS = ("clean", "I+", "consistency", "I-", "blank", "reliance", "dH (nats)")


def find_runs(paths: list[str]) -> list[dict]:
    """[{"algo", "seed", "run_dir"}] of the run folders given or found one level under a given folder."""
    runs = []
    for p in map(Path, paths):
        candidates = [p] if RUN_NAME.match(p.name) else sorted(c for c in p.iterdir() if c.is_dir())
        found = [(c, RUN_NAME.match(c.name)) for c in candidates if RUN_NAME.match(c.name)]
        if not found:
            raise SystemExit(f"--runs {p}: no <algo>-s<seed> run folder here or under it")
        runs += [{"algo": m["algo"], "seed": int(m["seed"]), "run_dir": str(c)} for c, m in found]
    return runs


def model_of(run_dir: Path) -> Path:
    """A run's last complete checkpoint, or the folder itself when it is a model folder."""
    from cppo.rl.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        return ckpt
    if (run_dir / "config.json").is_file():
        return run_dir
    raise SystemExit(f"{run_dir}: no complete checkpoint under checkpoints/ and no config.json")


def score(model_path: str, test_path: str, args: argparse.Namespace, threads: int) -> dict:
    """The views numbers of one model, per evaluation seed and their mean (overall and per type)."""
    import torch

    from cppo.detect.views_eval import evaluate_views
    from cppo.models import load_model_and_processor
    from cppo.rl.data import open_dataset
    from cppo.toy import CHANCE

    torch.set_num_threads(threads)
    model, processor = load_model_and_processor(model_path)
    test = open_dataset(test_path)
    per_seed = []
    for seed in args.eval_seeds:
        report = evaluate_views(
            model, processor, test, args.views, args.draws, chance=CHANCE, seed=seed, limit=args.n,
            samples=args.samples, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        )  # fmt: skip
        report.pop("items")
        per_seed.append(report)
    types = sorted(per_seed[0].get("per_type", {}))
    return {
        "model": model_path,
        "per_seed": per_seed,
        "mean": {k: _mean_of(r.get(k) for r in per_seed) for k in (*METRICS, "chance")},
        "per_type": {t: {k: _mean_of(r["per_type"][t][k] for r in per_seed) for k in METRICS} for t in types},
    }


def _mean_of(xs) -> float | None:
    xs = list(xs)
    return None if any(x is None for x in xs) else statistics.fmean(xs)


def _cell(xs: list[float], metric: str, signed: bool = False) -> str:
    """Mean ± CI half-width: points (x100) for rates, nats (signed) for the entropy shift."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    m, h = mean_ci(xs)
    scale, digits = (1, 3) if metric == "entropy_shift" else (100, 1)
    sign = "+" if signed or metric == "entropy_shift" else ""
    text = f"{scale * m:{sign}.{digits}f}"
    return text if len(xs) == 1 else f"{text} ± {scale * h:.{digits}f}"


def write_markdown(summary: dict, out: Path) -> str:
    a, start, runs = summary["args"], summary["start"], summary["runs"]
    algos = list(dict.fromkeys(r["algo"] for r in runs))
    sampling = "greedy" if a["samples"] == 1 else f"avg@{a['samples']} at T=1"
    lines = [
        f"Views: preset `{a['views']}`, {a['draws']} draw(s) of each kind an item; first {a['n']} test "
        f"items; {sampling}; evaluation seeds {a['eval_seeds']} (views and sampling), a model's number "
        "the mean over them; mean ± 95 % CI over training seeds (Student's t). Rates in %, "
        "reliance (clean − I-) in points, dH in nats.",
        "",
        "| model | " + " | ".join(HEADS) + " | chance | runs |",
        "|---|" + "---|" * (len(HEADS) + 2),
        "| start | " + " | ".join(_cell([start["mean"][k]], k) for k in METRICS)
        + f" | {_cell([start['mean']['chance']], 'chance')} | – |",
    ]  # fmt: skip
    for algo in algos:
        mine = [r for r in runs if r["algo"] == algo]
        cells = [_cell([r["mean"][k] for r in mine], k) for k in METRICS]
        lines.append(
            f"| {algo} | "
            + " | ".join(cells)
            + f" | {_cell([start['mean']['chance']], 'chance')} | {len(mine)} |"
        )
    by_seed = {x: {r["seed"]: r for r in runs if r["algo"] == x} for x in algos}
    pairs = [(b, a_) for i, a_ in enumerate(algos) for b in algos[i + 1 :]] + [(x, "start") for x in algos]
    lines += [
        "",
        "Differences paired by training seed:",
        "",
        "| difference | " + " | ".join(HEADS) + " | seeds |",
    ]
    lines.append("|---|" + "---|" * (len(HEADS) + 1))
    for hi, lo in pairs:
        seeds = sorted(set(by_seed[hi]) & set(by_seed.get(lo, by_seed[hi])))  # start: every seed of hi
        pick = {
            s: (by_seed[hi][s]["mean"], start["mean"] if lo == "start" else by_seed[lo][s]["mean"])
            for s in seeds
        }
        cells = [
            _cell([h[k] - l[k] for h, l in pick.values() if None not in (h[k], l[k])], k, True)
            for k in METRICS
        ]
        lines.append(f"| {hi} − {lo} | " + " | ".join(cells) + f" | {len(seeds)} |")
    types = sorted(start["per_type"])
    if types:
        lines += [
            "",
            "Per question type, mean over training seeds:",
            "",
            "| model | type | " + " | ".join(HEADS) + " |",
        ]
        lines.append("|---|---|" + "---|" * len(HEADS))
        for name, models in [("start", [start])] + [(x, [r for r in runs if r["algo"] == x]) for x in algos]:
            for t in types:
                vals = [_mean_of(m["per_type"][t][k] for m in models) for k in METRICS]
                lines.append(
                    f"| {name} | {t} | " + " | ".join(_cell([v], k) for v, k in zip(vals, METRICS)) + " |"
                )
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="run folders, or folders that hold them")
    p.add_argument("--start", default=None, help="the start model (default: the bundled demo model)")
    p.add_argument("--data", default=None, help="dataset with a test split (default: compare_algos' shapes)")
    p.add_argument("--n", type=int, default=200, help="first N test items")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--views", default="paper", help="a registered preset or a preset .yaml")
    p.add_argument("--draws", type=int, default=2, help="views of each kind per item")
    p.add_argument("--samples", type=int, default=1, help="answers per item (1: greedy; K > 1: T = 1)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--jobs", type=int, default=1, help="models scored at a time, each with 2 / jobs threads")
    p.add_argument("--out", default="runs/perception")
    args = p.parse_args(argv)
    from cppo.models import demo_model_path
    from cppo.rl.data import shapes_data
    from cppo.rl.sources import find_split

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = find_runs(args.runs)
    for r in runs:
        r["model"] = str(model_of(Path(r["run_dir"])))
    first = Path(args.runs[0])
    home = first.parent if RUN_NAME.match(first.name) else first  # compare_algos' --out
    data = Path(args.data) if args.data else shapes_data(home / "shapes", seed=0)
    test = str(find_split(data, "test"))
    start_model = args.start or str(demo_model_path())
    threads = max(1, 2 // args.jobs)
    t0 = time.time()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        start = pool.submit(score, start_model, test, args, threads)
        futures = [pool.submit(score, r["model"], test, args, threads) for r in runs]
        summary = {"args": vars(args), "data": test, "start": start.result(), "runs": []}
        for r, f in zip(runs, futures):
            summary["runs"].append({**r, **f.result()})
            print(f"[perception] {r['algo']} seed {r['seed']}: {summary['runs'][-1]['mean']}", flush=True)
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(write_markdown(summary, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
