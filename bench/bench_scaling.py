"""How the update phase of GRPO, official-style CPPO and this project's CPPO scales, on CPU.

    python bench/bench_scaling.py --sweep length    # T = 256 .. 4096 (G 4, V 16,384)
    python bench/bench_scaling.py --sweep group     # G = 4, 8, 16   (T 512, V 16,384)
    python bench/bench_scaling.py --sweep vocab     # V = 512 .. 151,936 (T 512, G 4)
    python bench/bench_scaling.py --sweep all --out docs/img

The three variants are those of bench/bench_step.py (`run_variant`): old/ref log-probs + the policy
update from the same starting weights, on the same rollouts. Rollouts here are synthetic: one
prompt with its shapes image, G responses of exactly T random ordinary tokens (no generation: it
would cost the same for every variant and take hours at T = 4096 on a CPU), views drawn from the
paper preset, rewards redrawn so that about half of the rows have A > 0. The model is a tiny
random Qwen2.5-VL (`--hidden` 64, 2 layers) so that a sweep takes minutes; the head and softmax
costs grow with V as in the real model, the backbone does not.

Memory: this process's RSS, sampled every 2 ms with psutil while the variant runs, minus the RSS
just before it (after `gc` and `malloc_trim`): the step's own memory, not the process's. Each point
and variant runs once (after one warm-up at the first point), in the order grpo, cppo_official,
cppo, so read the curves' shapes and ratios rather than single points.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402

from cppo.batching import ROW_KEYS, take_rows  # noqa: E402
from cppo.models import append_responses  # noqa: E402
from cppo.perturb import get_preset  # noqa: E402
from cppo.rl.rollout import Rollouts, prepare_prompts  # noqa: E402

SWEEPS = {
    "length": ("max_new_tokens", [256, 512, 1024, 2048, 4096], dict(group=4, vocab=16384)),
    "group": ("group", [4, 8, 16], dict(max_new_tokens=512, vocab=16384)),
    "vocab": ("vocab", [512, 8192, 32768, 151936], dict(max_new_tokens=512, group=4)),
}
LABELS = {"max_new_tokens": "response length T", "group": "group size G", "vocab": "vocabulary V"}


def synthetic_rollouts(processor, samples, group: int, length: int, image_token_id: int, seed: int):
    """Rollouts of G fixed-length random responses per prompt, with the paper preset's views."""
    tok = processor.tokenizer
    special = set(tok.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tok)) if i not in special])
    prompts = prepare_prompts(
        processor, samples, [1000 + i for i in range(len(samples))], "cppo", get_preset("paper")
    )
    rows = [b for b in range(len(samples)) for _ in range(group)]
    text_n = take_rows({k: v for k, v in prompts.batch.items() if k in ROW_KEYS}, rows, image_token_id)
    g = torch.Generator().manual_seed(seed)
    ids = ordinary[torch.randint(len(ordinary), (len(rows), length), generator=g)]
    mask = torch.ones(len(rows), length, dtype=torch.bool)
    ro = Rollouts(
        inputs=append_responses(text_n, ids, mask),
        response_ids=ids,
        response_mask=mask,
        has_image=torch.ones(len(rows), dtype=torch.bool),
        truncated=torch.ones(len(rows), dtype=torch.bool),
        pixel_values=prompts.batch["pixel_values"],
        image_grid_thw=prompts.batch["image_grid_thw"],
        images_per_prompt=prompts.images_per_prompt,
        views=prompts.views,
        rewards=torch.zeros(len(rows)),
        advantages=torch.zeros(len(rows)),
        texts=[""] * len(rows),
        samples=samples,
        view_records=prompts.view_records,
        reward_result=None,
    )
    bench_step.fake_advantages(ro, group, seed)
    return ro


def measure(args, setting: dict) -> dict:
    """{variant: {"seconds", "mb"}} at one point of a sweep."""
    a = argparse.Namespace(**{**vars(args), **setting})
    a.mini = None  # one optimizer update: no old log-probs, the reference pass only
    policy, processor = bench_step.build_model(a)
    ref = bench_step.frozen_reference(policy, a)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    samples = bench_step.make_samples(1, a.image_size, a.seed)
    ro = synthetic_rollouts(
        processor, samples, a.group, a.max_new_tokens, policy.config.image_token_id, a.seed
    )
    out = {}
    for variant in bench_step.VARIANTS:
        bench_step.trim_memory()
        with bench_step.RssSampler() as s:
            base = s.peak
            t0 = time.perf_counter()
            timer, _ = bench_step.run_variant(variant, policy, start, ref, ro, a)
            seconds = time.perf_counter() - t0
        out[variant] = {
            "seconds": seconds,
            "mb": (s.peak - base) / 2**20,
            "perception": timer.get("perception", 0),
        }
    return out


def sweep(args, name: str) -> dict:
    key, values, fixed = SWEEPS[name]
    points = []
    for i, v in enumerate(values):
        setting = {**fixed, key: v}
        if i == 0:
            measure(args, setting)  # warm-up
        res = measure(args, setting)
        points.append({"x": v, **res})
        print(
            f"[scaling {name}] {key}={v}: "
            + ", ".join(f"{k} {r['seconds']:.2f}s {r['mb']:.0f}MB" for k, r in res.items()),
            flush=True,
        )
    return {
        "sweep": name,
        "key": key,
        "fixed": fixed,
        "micro": args.micro,
        "hidden": args.hidden,
        "points": points,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["x"] for p in result["points"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for v, style, color in zip(bench_step.VARIANTS, ("o-", "s--", "^-"), ("C0", "C1", "C2")):
        kw = dict(color=color)
        axes[0].plot(xs, [p[v]["seconds"] for p in result["points"]], style, label=v, **kw)
        axes[1].plot(xs, [p[v]["mb"] for p in result["points"]], style, label=v, **kw)
        if v == "grpo":
            continue
        t_ratio = [p[v]["seconds"] / p["grpo"]["seconds"] for p in result["points"]]
        m_ratio = [p[v]["mb"] / max(p["grpo"]["mb"], 1) for p in result["points"]]
        axes[2].plot(xs, t_ratio, style, label=f"{v} time", **kw)
        axes[2].plot(xs, m_ratio, ":", marker=style[0], alpha=0.5, label=f"{v} memory", **kw)
    axes[2].axhline(1.0, color="C0", lw=0.8)
    axes[0].set_ylabel("old/ref + update, s")
    axes[1].set_ylabel("step's own peak RSS, MB")
    axes[2].set_ylabel("÷ GRPO")
    for ax in axes:
        ax.set_xlabel(LABELS[result["key"]])
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].legend(fontsize=7)
    axes[0].legend(fontsize=8)
    fixed = ", ".join(f"{k}={v}" for k, v in result["fixed"].items())
    fig.suptitle(
        f"{result['sweep']} sweep ({fixed}, micro-batch {result['micro']}, hidden {result['hidden']}, CPU)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", choices=(*SWEEPS, "all"), default="all")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--values", type=int, nargs="+", default=None, help="override the swept values")
    p.add_argument("--out", default=None, help="folder for <sweep>.json and scaling_<sweep>.png")
    p.add_argument("--plot-only", action="store_true", help="redraw the plots from --out's JSON files")
    args = p.parse_args(argv)
    if args.plot_only:
        for f in sorted(Path(args.out).glob("scaling_*.json")):
            plot(json.loads(f.read_text()), f.with_suffix(".png"))
        return 0
    args.size, args.device, args.dtype, args.prompts = "tiny", "cpu", "float32", 1
    torch.set_num_threads(args.threads)
    names = list(SWEEPS) if args.sweep == "all" else [args.sweep]
    for name in names:
        if args.values:
            key, _, fixed = SWEEPS[name]
            SWEEPS[name] = (key, args.values, fixed)
        res = sweep(args, name)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"scaling_{name}.json").write_text(json.dumps(res, indent=1))
            plot(res, out / f"scaling_{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
