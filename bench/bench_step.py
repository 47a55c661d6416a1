"""One training step of GRPO, of CPPO as the official code runs it, and of CPPO as this project runs it.

    python bench/bench_step.py                       # tiny random model on CPU, 5 repeats
    python bench/bench_step.py --size 3b --device cuda --max-new-tokens 1024   # real 3B config, bf16 compute

In one process, on the same model, data and seed, each repeat:
  1. collects the step's rollouts twice from the same weights and generator seed, once as GRPO
     (no views) and once as CPPO (plus the I+/I- views); the response ids are checked equal;
  2. runs, in a rotated order (A,B,C / B,C,A / ...), each variant's old/ref log-probs and policy
     update from a copy of the same starting weights and a fresh AdamW, on the CPPO rollouts:
     - `grpo`: PPO-clip + beta·KL(ref), no views;
     - `cppo_official`: as the official code: the I- and I+ passes on EVERY row (the perception
       term `ContrastivePerception(every_row=True)`), and every pass through the model's own full
       forward with all positions through the output head and the (n, T, V) logits in float32 at
       once (the scoring function `response_stats(..., full_logits=True)`, cppo.response_stats);
     - `cppo`: this project: views only on gated rows, head only on response positions, chunked.
Step time of a variant = its rollout (GRPO's or CPPO's) + its old/ref log-probs + its update. Ratios
to GRPO are taken per repeat, then summarised as median [min-max].

Responses have a fixed length and no end token (`--max-new-tokens`; end and vision tokens are
suppressed in sampling), so every variant and repeat scores the same number of tokens. A random
model earns no reward, so the rewards are redrawn from a fixed generator (`--seed`) from
{0, 0.1, 0.9, 1.0} per row before the group advantages: about 40-50 % of rows get A > 0 and open
the CPL gate (the share is printed).

Peak memory: on CUDA `torch.cuda.max_memory_allocated` of the old/ref + update phases (reset
before). On CPU, each variant runs once more in its own subprocess (`--memory-of`), which samples
its RSS with psutil every 2 ms during the old/ref + update phases after `malloc_trim`: it reports
that peak, its increase over the RSS just before the phases ("step's own memory"), and ru_maxrss.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import dataclasses
import functools
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
import types
from datetime import date

import numpy as np
import torch

import cppo.response_stats as stats_fns
from cppo.loss import group_advantages
from cppo.perturb import get_preset
from cppo.precision import resolve_dtype
from cppo.rl.config import TrainConfig
from cppo.rl.data import Sample
from cppo.rl.perception import ContrastivePerception
from cppo.rl.rewards import RewardScorer
from cppo.rl.rollout import collect_rollouts, prepare_prompts
from cppo.rl.update import Passes, Timer, policy_update, rollout_logprobs

VARIANTS = ("grpo", "cppo_official", "cppo")
# --ablate-share / --ablate-fused add these: grpo / cppo with one optimisation of cppo.response_stats off,
# i.e. the code before it: the vision tower once per row (share_images=False), the checkpointed
# autograd head of cppo.loss.entropy instead of the hand-written backward (fused=False).
ABLATIONS = {"share": ("grpo_noshare", "cppo_noshare"), "fused": ("grpo_unfused", "cppo_unfused")}
PHASES = ("rollout", "reward", "old_ref_logprobs", "update", "perception")

# Qwen2.5-VL-3B-Instruct's sizes (config.json); random weights.
SIZE_3B = dict(
    hidden_size=2048,
    num_layers=36,
    num_heads=16,
    num_kv_heads=2,
    intermediate_size=11008,
    vocab_size=151936,
    vision_hidden_size=1280,
    vision_depth=32,
    vision_heads=16,
    vision_intermediate_size=3420,
    max_position_embeddings=128000,
)


def build_model(args):
    """(policy, processor) of `--size` with `--hidden`/`--vocab` overrides, on `--device`."""
    from cppo.models import TinyVLMConfig, build_tiny_model

    if args.size == "3b":
        sizes = dict(SIZE_3B, image_size=args.image_size)
    else:
        h = args.hidden
        sizes = dict(
            hidden_size=h,
            num_heads=max(2, h // 32),
            num_kv_heads=1,
            intermediate_size=3 * h,
            num_layers=args.layers,
            image_size=args.image_size,
            max_position_embeddings=8192,
        )
        if args.vocab:
            sizes["vocab_size"] = args.vocab
    model, processor = build_tiny_model(TinyVLMConfig(**sizes), seed=args.seed)
    model = model.to(device=args.device)  # float32 master weights; forwards in --dtype (autocast)
    tok = processor.tokenizer
    banned = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    banned += [i for i in tok.all_special_ids if i not in banned]  # vision and other special tokens
    vocab = model.config.text_config.vocab_size
    banned += list(range(len(tok), vocab))  # rows beyond the tokenizer (a larger --vocab) cannot decode
    # Fixed-length responses, no EOS. The trainer's sampler applies only the settings its call passes
    # (never the model's generation_config), so the suppression is bound into this model's generate.
    # A bound method (not a closure over this instance), so that copy.deepcopy rebinds it to the copy.
    model.generate = types.MethodType(functools.partial(_generate_without, sorted(set(banned))), model)
    return model, processor


def _generate_without(banned: list[int], model, *args, **kwargs):
    """`model.generate` that never samples a token of `banned`."""
    return type(model).generate(model, *args, suppress_tokens=banned, **kwargs)


def make_samples(n: int, image_size: int, seed: int) -> list[Sample]:
    from cppo.toy import make_item

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        it = make_item(rng)
        image = it.image if it.image.size[0] == image_size else it.image.resize((image_size, image_size))
        out.append(Sample(index=i, question=it.question, answer=it.answer, images=[image]))
    return out


def frozen_reference(policy, args):
    """A frozen copy of `policy` in the compute dtype, as cppo-train holds its reference."""
    compute = resolve_dtype(args.dtype, torch.device(args.device))
    return copy.deepcopy(policy).to(compute).eval().requires_grad_(False)


def train_config(args, algo: str) -> TrainConfig:
    return TrainConfig(
        algo=algo,
        prompts_per_step=args.prompts,
        group_size=args.group,
        max_new_tokens=args.max_new_tokens,
        micro_batch_size=args.micro,
        mini_batch_size=args.mini,
        beta=0.01,
        logits_chunk_size=args.chunk,
        lr=1e-6,
        dtype=args.dtype,
        freeze_vision=False,  # the whole model, as the paper's configs train it
    )


def fake_advantages(ro, group: int, seed: int) -> float:
    """Redraw rewards (a random model earns none) so a realistic share of rows pass A > 0."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.1, 0.9, 1.0])
    ro.rewards = levels[torch.randint(0, 4, (ro.num_rows,), generator=g)]
    ro.advantages = group_advantages(ro.rewards, group)
    return float((ro.advantages > 0).float().mean())


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rollouts(model, processor, samples, args, algo: str, seed: int):
    cfg = train_config(args, algo)
    timer = Timer()
    _sync(args.device)
    t0 = time.perf_counter()
    ro = collect_rollouts(
        model,
        processor,
        prepare_prompts(
            processor, samples, [1000 + i for i in range(len(samples))], cfg.algo, get_preset("paper")
        ),
        cfg,
        RewardScorer(cfg.rewards, cfg.reward_weights),
        generator_seed=seed,
        timer=timer,
    )
    _sync(args.device)
    return ro, time.perf_counter() - t0, timer["reward"]


def variant_passes(variant: str) -> Passes:
    """The `Passes` that `variant` hands the update: how every pass is run, and (term) which rows
    get the I-/I+ passes."""
    if variant == "cppo_official":  # every pass on every row, all logits in float32 at once
        official = functools.partial(stats_fns.response_stats, full_logits=True)
        return Passes(forward=official, term=ContrastivePerception(every_row=True))
    kw = {"share_images": not variant.endswith("_noshare"), "fused": not variant.endswith("_unfused")}
    return Passes(forward=functools.partial(stats_fns.response_stats, **kw))


def run_variant(variant: str, policy, start_state, ref, ro, args) -> tuple[Timer, dict]:
    """Old/ref log-probs and the policy update of `variant` from `start_state`; (timer, metrics)."""
    from cppo.rl.run import build_optimizer  # the trainer's own optimizer and schedule

    algo = "grpo" if variant.startswith("grpo") else "cppo"
    passes = variant_passes(variant)
    cfg = train_config(args, algo)
    policy.load_state_dict(start_state)
    optimizer, scheduler = build_optimizer(policy, cfg, 8)
    ro = dataclasses.replace(ro, old_logp=None, ref_logp=None)
    timer = Timer()
    _sync(args.device)
    with timer("old_ref_logprobs"):
        if cfg.mini_batch_size and cfg.mini_batch_size < ro.num_rows:  # more than one update: off-policy
            ro.old_logp = rollout_logprobs(policy, ro, cfg, passes)
        ro.ref_logp = rollout_logprobs(ref, ro, cfg, passes)
        _sync(args.device)
    metrics = policy_update(policy, optimizer, scheduler, ro, cfg, timer, passes=passes)
    _sync(args.device)
    del optimizer, scheduler
    return timer, metrics


def tokens_of(ro) -> int:
    prompt = int(ro.inputs["attention_mask"][:, : ro.inputs["prompt_length"]].sum())
    return prompt + int(ro.response_mask.sum())


class RssSampler:
    """Peak RSS of this process, sampled by a thread every `period` seconds (psutil)."""

    def __init__(self, period: float = 0.002):
        import psutil

        self.proc, self.period, self.peak = psutil.Process(), period, 0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def trim_memory() -> None:
    """Return freed heap to the OS so the next RSS baseline is the live memory (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def setup(args):
    torch.set_num_threads(args.threads)
    policy, processor = build_model(args)
    ref = frozen_reference(policy, args)
    start_state = {k: v.clone() for k, v in policy.state_dict().items()}
    samples = make_samples(args.prompts, args.image_size, args.seed)
    return policy, processor, ref, start_state, samples


def memory_of(variant: str, args) -> dict:
    """Run one step of `variant` (as in the timed loop) and measure its memory."""
    policy, processor, ref, start_state, samples = setup(args)
    ro, _, _ = rollouts(policy, processor, samples, args, "cppo", args.seed)
    fake_advantages(ro, args.group, args.seed)
    policy.load_state_dict(start_state)
    run_variant(variant, policy, start_state, ref, ro, args)  # warm-up: allocator and lazy inits
    trim_memory()
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_variant(variant, policy, start_state, ref, ro, args)
        return {
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20,
            "delta_mb": (torch.cuda.max_memory_allocated() - base) / 2**20,
        }
    with RssSampler() as s:
        base = s.peak
        run_variant(variant, policy, start_state, ref, ro, args)
    return {
        "peak_mb": s.peak / 2**20,
        "delta_mb": (s.peak - base) / 2**20,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _fmt(v: tuple[float, float, float], digits: int = 2) -> str:
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}–{v[2]:.{digits}f}]"


def bench(args) -> dict:
    policy, processor, ref, start_state, samples = setup(args)
    variants = VARIANTS + (ABLATIONS["share"] if args.ablate_share else ())
    variants += ABLATIONS["fused"] if args.ablate_fused else ()
    rows: dict[str, list[dict]] = {v: [] for v in variants}
    shares, tokens = [], 0
    for r in range(args.repeats + 1):  # repeat 0 warms up and is dropped
        seed = args.seed + r
        policy.load_state_dict(start_state)
        order = ("grpo", "cppo") if r % 2 else ("cppo", "grpo")
        got = {}
        for algo in order:
            got[algo] = rollouts(policy, processor, samples, args, algo, seed)
        ro = got["cppo"][0]
        if not torch.equal(ro.response_ids, got["grpo"][0].response_ids):
            raise RuntimeError("GRPO and CPPO rollouts differ for the same weights and seed")
        share = fake_advantages(ro, args.group, seed)
        tokens = tokens_of(ro)
        k = r % len(variants)
        for variant in variants[k:] + variants[:k]:
            timer, metrics = run_variant(variant, policy, start_state, ref, ro, args)
            algo = "grpo" if variant.startswith("grpo") else "cppo"
            _, t_roll, t_rew = got[algo]
            row = {
                "rollout": t_roll,
                "reward": t_rew,
                "old_ref_logprobs": timer["old_ref_logprobs"],
                "update": timer["update"],
                "perception": timer.get("perception", 0.0),
                "cpl_rows": metrics.get("cpl/rows", 0.0),
            }
            row["step"] = row["rollout"] + row["old_ref_logprobs"] + row["update"]
            row["tokens_per_s"] = tokens / row["step"]
            if r > 0:
                rows[variant].append(row)
        if r > 0:
            shares.append(share)
        print(
            f"[bench_step] repeat {r}{' (warm-up)' if r == 0 else ''}: "
            + ", ".join(f"{v} {rows[v][-1]['step']:.2f}s" if r > 0 else v for v in variants),
            flush=True,
        )
    memory = {}
    if not args.no_memory:
        for variant in variants:
            memory[variant] = _memory_subprocess(variant, args)
    return _report(args, rows, memory, shares, tokens)


def _memory_subprocess(variant: str, args) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--memory-of", variant] + _shared_argv(args)
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _shared_argv(args) -> list[str]:
    keys = (
        "size",
        "device",
        "hidden",
        "layers",
        "vocab",
        "image_size",
        "prompts",
        "group",
        "max_new_tokens",
        "micro",
        "mini",
        "chunk",
        "threads",
        "seed",
    )
    argv = []
    for k in keys:
        v = getattr(args, k)
        if v is not None:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    return argv


def _report(args, rows, memory, shares, tokens) -> dict:
    out = {
        "args": vars(args),
        "tokens_per_step": tokens,
        "gate_share": statistics.mean(shares),
        "variants": {},
    }
    for v in rows:
        d = {}
        base = "grpo" + v[v.index("_") :] if v.endswith(("_noshare", "_unfused")) else "grpo"  # same code
        for key in PHASES + ("step", "tokens_per_s", "cpl_rows"):
            d[key] = _summary([row[key] for row in rows[v]])
        for key in ("step", "update", "old_ref_logprobs"):
            ratios = [a[key] / b[key] for a, b in zip(rows[v], rows[base])]
            d[f"{key}_ratio"] = _summary(ratios)
        if memory:
            d["memory"] = memory[v]
            for key in ("peak_mb", "delta_mb"):
                d[f"{key}_ratio"] = memory[v][key] / memory[base][key]
        out["variants"][v] = d
    return out


def markdown(res: dict) -> str:
    a = res["args"]
    V = res["variants"]
    VARIANTS = list(V)
    lines = [
        f"rows {a['prompts']}×{a['group']}, response {a['max_new_tokens']} tokens, micro-batch {a['micro']}, "
        f"mini-batch {a['mini']}, {res['tokens_per_step']} tokens/step, "
        f"A>0 on {100 * res['gate_share']:.0f} % of rows; {a['repeats']} repeats, median [min–max]",
        "",
        "| | " + " | ".join(VARIANTS) + " |",
        "|---|" + "---|" * len(VARIANTS),
    ]
    for key, label in (
        ("rollout", "rollout s (incl. reward, views)"),
        ("reward", "reward s"),
        ("old_ref_logprobs", "old/ref log-probs s"),
        ("update", "policy update s (incl. perception)"),
        ("perception", "perception forward s (I−, I+)"),
        ("cpl_rows", "rows with I+ pass per micro-batch"),
        ("step", "step s"),
        ("tokens_per_s", "tokens/s"),
    ):
        lines.append(f"| {label} | " + " | ".join(_fmt(V[v][key]) for v in VARIANTS) + " |")
    for key, label in (
        ("old_ref_logprobs_ratio", "old/ref ÷ GRPO"),
        ("update_ratio", "update ÷ GRPO"),
        ("step_ratio", "**step ÷ GRPO**"),
    ):
        lines.append(f"| {label} | " + " | ".join(_fmt(V[v][key]) for v in VARIANTS) + " |")
    if "memory" in V["grpo"]:
        lines.append(
            "| peak RSS MB (old/ref + update) | "
            + " | ".join(f"{V[v]['memory']['peak_mb']:.0f}" for v in VARIANTS)
            + " |"
        )
        lines.append(
            "| step's own MB (peak − before) | "
            + " | ".join(f"{V[v]['memory']['delta_mb']:.0f}" for v in VARIANTS)
            + " |"
        )
        lines.append(
            "| **peak ÷ GRPO** | " + " | ".join(f"{V[v]['peak_mb_ratio']:.2f}" for v in VARIANTS) + " |"
        )
        lines.append(
            "| step's own ÷ GRPO | " + " | ".join(f"{V[v]['delta_mb_ratio']:.2f}" for v in VARIANTS) + " |"
        )
    return "\n".join(lines)


def head_bench(args) -> str:
    """The output head alone, forward + backward of sum(logp), fused (hand-written backward) against the
    checkpointed chunks it replaced, interleaved, on random (rows, T, hidden) states and a (V, hidden)
    head; isolates the head from the rest of the step (and from most of the machine's noise)."""
    from cppo.loss.entropy import chunked_entropy_and_logprob

    torch.manual_seed(args.seed)
    V = args.vocab or 151936
    h = torch.randn(args.micro, args.max_new_tokens, args.hidden, requires_grad=True)
    w = (torch.randn(V, args.hidden) * 0.02).requires_grad_(True)
    tgt = torch.randint(0, V, (args.micro, args.max_new_tokens))
    mask = torch.ones_like(tgt, dtype=torch.bool)

    def fused():
        return stats_fns.fused_head_stats(h, w, tgt, mask, 1.0, args.chunk)

    def plain():
        return chunked_entropy_and_logprob(h, w, tgt, chunk_size=args.chunk, mask=mask)

    times = {"fused": [], "checkpointed": []}
    for r in range(args.repeats + 1):
        for name, fn in (("fused", fused), ("checkpointed", plain))[:: 1 if r % 2 else -1]:
            h.grad = w.grad = None
            t0 = time.perf_counter()
            fn()[1].sum().backward()
            if r:
                times[name].append(time.perf_counter() - t0)
    ratio = _summary([a / b for a, b in zip(times["fused"], times["checkpointed"])])
    return (
        f"head fwd+bwd, {args.micro}x{args.max_new_tokens} positions, D {args.hidden}, V {V}, "
        f"chunk {args.chunk}: fused {_fmt(_summary(times['fused']), 3)} s, "
        f"checkpointed {_fmt(_summary(times['checkpointed']), 3)} s, "
        f"fused ÷ checkpointed {_fmt(ratio)} ({args.repeats} interleaved repeats)"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("tiny", "3b"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="compute precision (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--hidden", type=int, default=128, help="tiny: text width")
    p.add_argument("--layers", type=int, default=2, help="tiny: text layers")
    p.add_argument("--vocab", type=int, default=None, help="tiny: vocabulary rows (default: tokenizer's)")
    p.add_argument("--image-size", type=int, default=112, help="image side in px (3b: try 448)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--micro", type=int, default=5)
    p.add_argument("--mini", type=int, default=10)
    p.add_argument("--chunk", type=int, default=256, help="logits_chunk_size of the chunked head")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (2 threads on a shared 2-core VM ran 18x slower)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--ablate-share", action="store_true", help="add grpo/cppo with per-row image encoding")
    p.add_argument("--ablate-fused", action="store_true", help="add grpo/cppo with the checkpointed head")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--head-only", action="store_true", help="time only the output head: fused vs checkpointed"
    )
    p.add_argument(
        "--memory-of", choices=VARIANTS + sum(ABLATIONS.values(), ()), default=None, help=argparse.SUPPRESS
    )
    return p


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parser().parse_args(argv)
    if args.head_only:
        torch.set_num_threads(args.threads)
        print(head_bench(args))
        return 0
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args)))
        return 0
    res = bench(args)
    res["machine"] = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    res["date"] = date.today().isoformat()
    print(markdown(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
