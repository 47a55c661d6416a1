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

Generation runs in batches of `--generation-batch-size` rows (default: sized from free memory,
cppo.rl.generation), by the trainer's default rollout engine (cppo.models.rollout_engine), each
group from its own seed on the device's generators; each step reports its generation calls and
rows per call, and the padding
share of the update's passes (token slots the backbone was given that are padding, after each
pass is cut to its own rows). A random model almost never samples an end token, so every response
runs to `--max-new-tokens`; `--mixed-lengths` then cuts them to long-tailed lengths (as
bench/bench_padding.py), and `--padding` adds one CPPO step's old/ref + update on such rollouts,
padded to the step's longest row against trimmed (and sorted by length), with its tokens/s and peak
memory, and whether two generation batch sizes sampled the same responses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_padding  # noqa: E402  (bench/ is not a package)
import bench_step  # noqa: E402

import cppo.rl.generation as generation  # noqa: E402
from cppo.models import TinyVLMConfig, build_tiny_model  # noqa: E402
from cppo.perturb import get_preset  # noqa: E402
from cppo.rl.config import TrainConfig  # noqa: E402
from cppo.rl.generation import generation_rows  # noqa: E402
from cppo.rl.policy import enable_gradient_checkpointing  # noqa: E402
from cppo.rl.reporting import reset_peak_memory, step_metrics  # noqa: E402
from cppo.rl.rewards import RewardScorer  # noqa: E402
from cppo.rl.rollout import collect_rollouts, prepare_prompts  # noqa: E402
from cppo.rl.run import build_optimizer  # noqa: E402
from cppo.rl.update import Passes, Timer, policy_update, rollout_logprobs  # noqa: E402

REPORTED = (
    "time/step",
    "time/rollout",
    "time/old_ref_logprobs",
    "time/update",
    "time/perception",
    "throughput/tokens_per_s",
    "memory/peak_mb",
    "response/length",
    "generate/calls",
    "generate/rows_per_call",
    "update/padding_share",
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
    ref = bench_step.frozen_reference(model, args)
    enable_gradient_checkpointing(model)
    return model, processor, ref


def train_config(args, algo: str) -> TrainConfig:
    """bench_step's step config, with what a GPU run adds: no warm-up, gradient checkpointing and
    the generation batch."""
    base = bench_step.train_config(argparse.Namespace(**vars(args), chunk=256), algo)
    return dataclasses.replace(
        base, warmup_steps=0, gradient_checkpointing=True, generation_batch_size=args.generation_batch_size
    )


def _record(calls: list[int], out: tuple):
    calls.append(out[0].shape[0])
    return out


def rollout(model, processor, samples, cfg, seed: int, args, timer: Timer):
    """The step's rollouts, each group from its own seed; (rollouts, rows of each generate call)."""
    calls = []  # rows of each call, whichever engine makes them
    engines = {name: getattr(generation, name) for name in ("sample_groups", "generate_responses")}
    for name, real in engines.items():
        setattr(generation, name, lambda *a, _real=real, **kw: _record(calls, _real(*a, **kw)))
    try:
        with timer("rollout"):
            ro = collect_rollouts(
                model, processor,
                prepare_prompts(processor, samples, [1000 + i for i in range(len(samples))], cfg.algo,
                                get_preset("paper")),
                cfg, RewardScorer(["format"], [1.0]), generator_seed=seed, timer=timer,
                per_prompt_seeds=[seed * 1000 + i for i in range(len(samples))],
            )  # fmt: skip
    finally:
        for name, real in engines.items():
            setattr(generation, name, real)
    if args.mixed_lengths:
        ro = bench_padding.mixed_lengths(ro, args, processor.tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    bench_step.fake_advantages(ro, cfg.group_size, seed)
    return ro, calls


def update(model, ref, optimizer, scheduler, ro, cfg, timer: Timer, trim: bool = True) -> dict[str, float]:
    """Old/ref log-probs and the policy update; the update's metrics, its padding share and tokens/s."""
    slots = bench_padding.SlotCounter(model, ref)
    with timer("old_ref_logprobs"):
        ro.old_logp = rollout_logprobs(model, ro, cfg, Passes(trim=trim))
        ro.ref_logp = rollout_logprobs(ref, ro, cfg, Passes(trim=trim))
    metrics = policy_update(model, optimizer, scheduler, ro, cfg, timer, passes=Passes(trim=trim))
    slots.close()
    _sync(model)
    metrics["update/padding_share"] = 1 - slots.real / slots.slots
    seconds = timer["old_ref_logprobs"] + timer["update"]
    metrics["update/tokens_per_s"] = bench_step.tokens_of(ro) / seconds
    return metrics


def one_step(model, processor, ref, optimizer, scheduler, samples, cfg, seed: int, args) -> dict[str, float]:
    """One training step as the loop runs it (rollout, old/ref log-probs, update); its metrics."""
    device = next(model.parameters()).device
    reset_peak_memory(device)
    timer = Timer()
    t0 = time.perf_counter()
    ro, calls = rollout(model, processor, samples, cfg, seed, args, timer)
    metrics = update(model, ref, optimizer, scheduler, ro, cfg, timer)
    metrics.update(step_metrics(ro, timer, time.perf_counter() - t0, device, 1))
    metrics["generate/calls"] = float(len(calls))
    metrics["generate/rows_per_call"] = float(max(calls))
    return metrics


def padding_check(model, processor, ref, optimizer, scheduler, samples, cfg, args) -> dict:
    """On one CPPO rollout cut to mixed lengths: old/ref + update padded to the step's longest row,
    trimmed, and sorted by length, from the same weights (after a warm-up); and whether one group
    per generate call samples what the configured generation batch sampled."""
    args = argparse.Namespace(**{**vars(args), "mixed_lengths": True})
    device = next(model.parameters()).device
    start = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    ro, calls = rollout(model, processor, samples, cfg, args.seed, args, Timer())
    out = {}
    for name in ("warm-up", "padded", "trimmed", "sorted"):
        model.load_state_dict(start)
        cfg.sort_by_length = name == "sorted"
        reset_peak_memory(device)
        fresh = dataclasses.replace(ro, old_logp=None, ref_logp=None)
        m = update(model, ref, optimizer, scheduler, fresh, cfg, Timer(), trim=name != "padded")
        m.update(step_metrics(fresh, Timer(), 1.0, device, 1))
        out[name] = {
            k: m[k] for k in ("update/tokens_per_s", "update/padding_share", "memory/peak_mb") if k in m
        }
    del out["warm-up"]
    cfg.sort_by_length = False
    base = out["padded"]["update/tokens_per_s"]
    for name, v in out.items():
        v["tokens_per_s_ratio"] = v["update/tokens_per_s"] / base
        print(f"[gpu_step] padding {name}: " + ", ".join(f"{k} {x:.4g}" for k, x in v.items()), flush=True)
    cfg.generation_batch_size, configured = cfg.group_size, cfg.generation_batch_size
    model.load_state_dict(start)
    alone, one_calls = rollout(model, processor, samples, cfg, args.seed, args, Timer())
    cfg.generation_batch_size = configured
    same = sum(torch.equal(a, b) for a, b in zip(alone.response_ids, ro.response_ids))
    print(f"[gpu_step] {max(one_calls)} rows per generate call vs {max(calls)}: {same} of {ro.num_rows} rows "
          "sampled the same response", flush=True)  # fmt: skip
    out["same_samples_rows"] = [same, ro.num_rows]
    out["rows_per_call"] = [max(one_calls), max(calls)]
    return out


def _sync(model) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args) -> dict:
    samples = bench_step.make_samples(args.prompts, args.image_size, args.seed)
    results, out = {}, {"settings": vars(args)}
    for algo in ("grpo", "cppo"):
        model, processor, ref = build(args)
        cfg = train_config(args, algo)
        updates = math.ceil(cfg.rollouts / cfg.mini_batch_size) * (args.steps + 6)
        optimizer, scheduler = build_optimizer(model, cfg, updates)
        steps = []
        if algo == "grpo":
            rows = generation_rows(model, cfg, 512)
            print(f"[gpu_step] default generation batch for 512-token prompts: {rows} rows", flush=True)
        for s in range(args.steps + 1):  # the first is a warm-up
            m = one_step(model, processor, ref, optimizer, scheduler, samples, cfg, args.seed + s, args)
            if s > 0:
                steps.append({k: m[k] for k in REPORTED if k in m})
                line = ", ".join(f"{k} {m[k]:.4g}" for k in REPORTED if k in m)
                print(f"[gpu_step] {algo} step {s}: {line}", flush=True)
            if not all(math.isfinite(v) for v in (m["grad_norm"], m["grpo/pg_loss"])):
                raise SystemExit(f"[gpu_step] {algo} step {s}: non-finite loss or gradient norm")
        results[algo] = steps
        if algo == "cppo" and args.padding:
            out["padding"] = padding_check(model, processor, ref, optimizer, scheduler, samples, cfg, args)
        del model, ref, optimizer
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    ratio = results["cppo"][-1]["time/step"] / results["grpo"][-1]["time/step"]
    print(f"[gpu_step] CPPO / GRPO step time: {ratio:.2f}x (last measured step)", flush=True)
    out.update(steps=results, cppo_over_grpo=ratio)
    return out


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
    p.add_argument("--generation-batch-size", type=int, default=None, help="rows per generate call")
    p.add_argument("--mixed-lengths", action="store_true", help="cut responses to long-tailed lengths")
    p.add_argument("--mean-share", type=float, default=0.2, help="--mixed-lengths: typical length / max")
    p.add_argument("--padding", action="store_true", help="add the padded/trimmed/sorted CPPO step")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
