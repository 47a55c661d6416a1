"""Training steps of the trainer's own GPU path: bf16 compute over float32 master weights.

    python bench/gpu_step.py --size 3b --device cuda --max-new-tokens 256 --json out.json   # GPU
    python bench/gpu_step.py --size tiny --device cpu --max-new-tokens 8                    # smoke

The model is Qwen2.5-VL-3B-shaped (`bench_step.SIZE_3B`) with random weights (nothing is
downloaded), loaded in float32 and trained as `cppo-train` trains it: forwards under bf16 autocast
(`--dtype auto` on CUDA), a bf16 frozen reference, gradient checkpointing, AdamW on the float32
parameters, one warm-up step and then `--steps` measured steps per algorithm (GRPO, CPPO) on the
same prompts. A random model earns no reward, so rewards are redrawn from a fixed generator
(`bench_step.fake_advantages`) and about half of the rows open the CPL gate. Each measured step
prints the trainer's own metrics: seconds per phase (rollout, old/ref log-probs, update, the
I-/I+ forwards), tokens/s over prompt and response tokens, and this step's peak memory
(`torch.cuda.max_memory_allocated`, reset at the step's start).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (bench/ is not a package)

from cppo.models import TinyVLMConfig, build_tiny_model  # noqa: E402
from cppo.perturb import get_preset  # noqa: E402
from cppo.precision import resolve_dtype  # noqa: E402
from cppo.rl.config import TrainConfig  # noqa: E402
from cppo.rl.reporting import reset_peak_memory, step_metrics  # noqa: E402
from cppo.rl.rewards import RewardScorer  # noqa: E402
from cppo.rl.rollout import collect_rollouts  # noqa: E402
from cppo.rl.run import build_optimizer, enable_gradient_checkpointing  # noqa: E402
from cppo.rl.update import Timer, policy_update, rollout_logprobs  # noqa: E402

REPORTED = (
    "time/step",
    "time/rollout",
    "time/old_ref_logprobs",
    "time/update",
    "time/perception",
    "throughput/tokens_per_s",
    "memory/peak_mb",
    "response/length",
)


def build(args):
    """(policy in float32 with gradient checkpointing, processor, frozen reference in compute dtype)."""
    if args.size == "3b":
        sizes = dict(bench_step.SIZE_3B, image_size=args.image_size)
    else:
        sizes = dict(hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=192, num_layers=2)
        sizes["image_size"] = args.image_size
    model, processor = build_tiny_model(TinyVLMConfig(**sizes), seed=args.seed)
    model = model.to(args.device)  # float32 master weights
    compute = resolve_dtype(args.dtype, torch.device(args.device))
    ref = copy.deepcopy(model).to(compute).eval().requires_grad_(False)
    enable_gradient_checkpointing(model)
    return model, processor, ref


def train_config(args, algo: str) -> TrainConfig:
    return TrainConfig(
        algo=algo,
        prompts_per_step=args.prompts,
        group_size=args.group,
        max_new_tokens=args.max_new_tokens,
        micro_batch_size=args.micro,
        mini_batch_size=args.mini,
        beta=0.01,
        lr=1e-6,
        warmup_steps=0,
        dtype=args.dtype,
        gradient_checkpointing=True,
    )


def one_step(model, processor, ref, optimizer, scheduler, samples, cfg, seed: int) -> dict[str, float]:
    """One training step as the loop runs it (rollout, old/ref log-probs, update); its metrics."""
    device = next(model.parameters()).device
    reset_peak_memory(device)
    timer = Timer()
    t0 = time.perf_counter()
    with timer("rollout"):
        ro = collect_rollouts(
            model, processor, samples, [1000 + i for i in range(len(samples))], cfg, get_preset("paper"),
            RewardScorer(["format"], [1.0]), generator_seed=seed, timer=timer,
        )  # fmt: skip
    bench_step.fake_advantages(ro, cfg.group_size, seed)
    with timer("old_ref_logprobs"):
        ro.old_logp = rollout_logprobs(model, ro, cfg)
        ro.ref_logp = rollout_logprobs(ref, ro, cfg)
    metrics = policy_update(model, optimizer, scheduler, ro, cfg, timer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    metrics.update(step_metrics(ro, timer, time.perf_counter() - t0, device, 1))
    return metrics


def run(args) -> dict:
    samples = bench_step.make_samples(args.prompts, args.image_size, args.seed)
    results = {}
    for algo in ("grpo", "cppo"):
        model, processor, ref = build(args)
        cfg = train_config(args, algo)
        updates = math.ceil(cfg.rollouts / cfg.mini_batch_size) * (args.steps + 1)
        optimizer, scheduler = build_optimizer(model, cfg, updates)
        steps = []
        for s in range(args.steps + 1):  # the first is a warm-up
            m = one_step(model, processor, ref, optimizer, scheduler, samples, cfg, seed=args.seed + s)
            if s > 0:
                steps.append({k: m[k] for k in REPORTED if k in m})
                line = ", ".join(f"{k} {m[k]:.4g}" for k in REPORTED if k in m)
                print(f"[gpu_step] {algo} step {s}: {line}", flush=True)
            if not all(math.isfinite(v) for v in (m["grad_norm"], m["grpo/pg_loss"])):
                raise SystemExit(f"[gpu_step] {algo} step {s}: non-finite loss or gradient norm")
        results[algo] = steps
        del model, ref, optimizer
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    ratio = results["cppo"][-1]["time/step"] / results["grpo"][-1]["time/step"]
    print(f"[gpu_step] CPPO / GRPO step time: {ratio:.2f}x (last measured step)", flush=True)
    return {"settings": vars(args), "steps": results, "cppo_over_grpo": ratio}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("tiny", "3b"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="compute precision (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--micro", type=int, default=5)
    p.add_argument("--mini", type=int, default=10, help="rollouts per optimizer update")
    p.add_argument("--steps", type=int, default=1, help="measured steps per algorithm, after a warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
