"""Padding: one step with mixed response lengths, padded to the step's longest row against cut to each
micro-batch's own rows, on CPU (docs/benchmarks.md, "Padding and memory").

    python bench/bench_padding.py                         # tiny random model, 20 rows up to 512 tokens
    python bench/bench_padding.py --max-new-tokens 1024 --algo grpo --json out.json

Rollouts are synthetic (as bench/bench_scaling.py's): the shapes prompts with their images and the
paper preset's views, G responses each of random ordinary tokens whose lengths are drawn from a
long-tailed distribution (lognormal around `--mean-share` of `--max-new-tokens`, at least 8 tokens
or T/4, one row at the maximum), rewards redrawn so that about half the rows open the CPL gate. Each
variant runs the step's old/ref log-probs and policy update (bench_step.run_variant: the trainer's
optimizer, a fresh copy of the same starting weights) on the same rollouts:

- `padded`: every pass on the step's L + T columns (the trainer before this change, `trim=False`);
- `trimmed`: every pass cut to its own rows' longest prompt and response (the default);
- `sorted`: trimmed, and each mini-batch's rows sorted by length into its micro-batches
  (`--sort-by-length`).

Tokens/s counts the rows' real tokens (prompt + response, the same for every variant) over the
seconds of old/ref + update; "token slots" counts what the backbone was given (rows x columns of
every pass, policy and reference). Repeats rotate the order; ratios to `padded` are per repeat,
median [min-max]. Memory: each variant runs once more in its own subprocess (`--memory-of`),
sampling its RSS every 2 ms (bench_step.RssSampler) after a warm-up run and `malloc_trim`: the peak,
and its rise over the RSS just before the step ("step's own").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_scaling  # noqa: E402
import bench_step  # noqa: E402

from cppo.batching import ROW_KEYS  # noqa: E402
from cppo.models import append_responses  # noqa: E402
from cppo.rl.run import build_optimizer  # noqa: E402
from cppo.rl.update import Passes, Timer, policy_update, rollout_logprobs  # noqa: E402

VARIANTS = ("padded", "trimmed", "sorted")


def mixed_lengths(ro, args, pad_id: int):
    """`ro` with row i's response cut to a drawn length (padding after): a step of mixed lengths."""
    rng = np.random.default_rng(args.seed)
    T = ro.response_ids.shape[1]
    drawn = np.exp(rng.normal(np.log(args.mean_share * T), 0.8, ro.num_rows))
    lengths = np.clip(np.round(drawn), min(8, max(1, T // 4)), T).astype(int)
    lengths[rng.integers(ro.num_rows)] = T  # the step's longest row
    cut = torch.arange(T)[None] >= torch.as_tensor(lengths)[:, None]
    ids, mask = ro.response_ids.masked_fill(cut, pad_id), ro.response_mask & ~cut
    L = ro.inputs["prompt_length"]
    prompt = {k: ro.inputs[k][:, :L] for k in ROW_KEYS}
    return dataclasses.replace(
        ro, inputs=append_responses(prompt, ids, mask), response_ids=ids, response_mask=mask
    )


def setup(args):
    torch.set_num_threads(args.threads)
    policy, processor = bench_step.build_model(args)
    ref = bench_step.frozen_reference(policy, args)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    samples = bench_step.make_samples(args.prompts, args.image_size, args.seed)
    ro = bench_scaling.synthetic_rollouts(
        processor, samples, args.group, args.max_new_tokens, policy.config.image_token_id, args.seed
    )
    ro = mixed_lengths(ro, args, processor.tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    return policy, ref, start, ro


def run_variant(variant: str, policy, start, ref, ro, args) -> Timer:
    """Old/ref log-probs and the policy update of one step, as the trainer runs them."""
    cfg = bench_step.train_config(args, args.algo)
    cfg.sort_by_length = variant == "sorted"
    trim = variant != "padded"
    policy.load_state_dict(start)
    optimizer, scheduler = build_optimizer(policy, cfg, 8)
    ro = dataclasses.replace(ro, old_logp=None, ref_logp=None)
    timer = Timer()
    with timer("old_ref_logprobs"):
        if cfg.mini_batch_size and cfg.mini_batch_size < ro.num_rows:
            ro.old_logp = rollout_logprobs(policy, ro, cfg, Passes(trim=trim))
        ro.ref_logp = rollout_logprobs(ref, ro, cfg, Passes(trim=trim))
    policy_update(policy, optimizer, scheduler, ro, cfg, timer, passes=Passes(trim=trim))
    return timer


class SlotCounter:
    """Token slots (rows x columns) and real tokens the backbones were given, over every pass."""

    def __init__(self, *models):
        self.slots = self.real = 0
        self.hooks = [m.model.register_forward_pre_hook(self._count, with_kwargs=True) for m in models]

    def _count(self, module, args, kwargs):
        # the columns this call runs: all of them, or the responses on a cached prompt
        # (cppo.response_stats.shared_prompt_hidden, whose mask also covers the cached columns)
        x = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"][..., 0]
        self.slots += x.numel()
        self.real += int(kwargs["attention_mask"][:, -x.shape[1] :].sum())

    def close(self):
        for h in self.hooks:
            h.remove()


def bench(args) -> dict:
    policy, ref, start, ro = setup(args)
    tokens = bench_step.tokens_of(ro)
    rows = {v: [] for v in VARIANTS}
    slots = {}
    for r in range(args.repeats + 1):  # repeat 0 warms up and is dropped
        k = r % len(VARIANTS)
        for variant in VARIANTS[k:] + VARIANTS[:k]:
            counter = SlotCounter(policy, ref)
            t0 = time.perf_counter()
            timer = run_variant(variant, policy, start, ref, ro, args)
            seconds = time.perf_counter() - t0
            counter.close()
            slots[variant] = (counter.slots, counter.real)
            if r > 0:
                rows[variant].append({"seconds": seconds, "update": timer["update"],
                                      "old_ref": timer["old_ref_logprobs"]})  # fmt: skip
        print(f"[bench_padding] repeat {r}{' (warm-up)' if r == 0 else ''}", flush=True)
    memory = {v: _memory_subprocess(v, args) for v in VARIANTS} if not args.no_memory else {}
    lengths = ro.response_mask.sum(1).float()
    out = {
        "args": vars(args),
        "rows": ro.num_rows,
        "tokens_per_step": tokens,
        "response_lengths": {
            "mean": float(lengths.mean()),
            "max": int(lengths.max()),
            "min": int(lengths.min()),
        },
        "variants": {},
    }
    for v in VARIANTS:
        d = {"seconds": _summary([x["seconds"] for x in rows[v]])}
        d["tokens_per_s"] = _summary([tokens / x["seconds"] for x in rows[v]])
        d["speedup"] = _summary([b["seconds"] / a["seconds"] for a, b in zip(rows[v], rows["padded"])])
        d["token_slots"], d["real_tokens"] = slots[v]
        d["padding_share"] = 1 - slots[v][1] / slots[v][0]
        if memory:
            d["memory"] = memory[v]
            for key in ("peak_mb", "delta_mb"):
                d[f"{key}_ratio"] = memory[v][key] / memory["padded"][key]
        out["variants"][v] = d
    return out


def memory_of(variant: str, args) -> dict:
    policy, ref, start, ro = setup(args)
    run_variant(variant, policy, start, ref, ro, args)  # warm-up: allocator and lazy inits
    bench_step.trim_memory()
    with bench_step.RssSampler() as s:
        base = s.peak
        run_variant(variant, policy, start, ref, ro, args)
    return {"peak_mb": s.peak / 2**20, "delta_mb": (s.peak - base) / 2**20}


def _memory_subprocess(variant: str, args) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--memory-of", variant]
    for k, v in vars(args).items():
        if k not in ("memory_of", "json", "repeats", "no_memory") and v is not None and v is not False:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def markdown(res: dict) -> str:
    a, V, n = res["args"], res["variants"], res["response_lengths"]
    f = bench_step._fmt
    lines = [
        f"{a['algo']}, {res['rows']} rows ({a['prompts']}×{a['group']}), responses "
        f"{n['min']}–{n['max']} tokens (mean {n['mean']:.0f}), micro-batch {a['micro']}, mini-batch "
        f"{a['mini']}, {res['tokens_per_step']} real tokens; old/ref log-probs + update, "
        f"{a['repeats']} repeats, median [min–max]",
        "",
        "| | " + " | ".join(VARIANTS) + " |",
        "|---|" + "---|" * len(VARIANTS),
        "| token slots given to the backbone | "
        + " | ".join(f"{V[v]['token_slots']}" for v in VARIANTS)
        + " |",
        "| padding share of those | "
        + " | ".join(f"{100 * V[v]['padding_share']:.0f} %" for v in VARIANTS)
        + " |",
        "| seconds | " + " | ".join(f(V[v]["seconds"]) for v in VARIANTS) + " |",
        "| tokens/s | " + " | ".join(f(V[v]["tokens_per_s"], 0) for v in VARIANTS) + " |",
        "| **tokens/s ÷ padded** | " + " | ".join(f(V[v]["speedup"]) for v in VARIANTS) + " |",
    ]
    if "memory" in V["padded"]:
        lines += [
            "| peak RSS MB | " + " | ".join(f"{V[v]['memory']['peak_mb']:.0f}" for v in VARIANTS) + " |",
            "| step's own MB (peak − before) | "
            + " | ".join(f"{V[v]['memory']['delta_mb']:.0f}" for v in VARIANTS) + " |",
            "| **step's own ÷ padded** | "
            + " | ".join(f"{V[v]['delta_mb_ratio']:.2f}" for v in VARIANTS) + " |",
        ]  # fmt: skip
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algo", choices=("grpo", "cppo"), default="cppo")
    p.add_argument("--size", choices=("tiny",), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--mean-share", type=float, default=0.2, help="typical response length / max_new_tokens")
    p.add_argument("--micro", type=int, default=5)
    p.add_argument("--mini", type=int, default=10)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--memory-of", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parser().parse_args(argv)
    if args.memory_of:
        print(json.dumps(memory_of(args.memory_of, args)))
        return 0
    res = bench(args)
    res["machine"] = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(markdown(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
