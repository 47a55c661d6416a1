"""Rollout throughput: the rollout engine (cppo.models.rollout_engine) against transformers' `generate`
on each prompt repeated G times (`--rollout-engine hf`), CPU here, CUDA where present.

    python bench/bench_rollout.py                          # the grid below, about 10 minutes on 2 busy cores
    python bench/bench_rollout.py --models large --group-sizes 8 --caps 512 --repeats 5

Grid: two models x G in {5, 8} x response caps {128, 512}, B = `--prompts` prompts a call, sampled
at temperature 1 from per-prompt seeds (as `--seed-per-prompt`):
- `demo`: the bundled demo model (3 layers, 192 wide) on the shapes task's 112 px images (16 image
  tokens); trained, it ends its own responses (its lengths, not the cap, end the call);
- `large`: a random tiny Qwen2.5-VL, 4 layers 256 wide, vision tower 4 blocks 128 wide, on the same
  images resized to 448 px: 1,024 patches, 256 image tokens a prompt, as a real image gives.
  A random model never ends, so its output head gets a bias on `<|im_end|>` aimed at ending each
  token with probability 3 / cap (`end_bias`, from the logits at the prompts' end: the lengths come
  out longer, median about cap / 2 at cap 512): a mix of early and late ends, some rows cut at the
  cap. The table reports the measured lengths.

`--decode cuda-graphs` (CUDA) runs the engine's static-cache decode captured as CUDA graphs
(`--rollout-engine cppo-graphs`); its first call per batch size compiles, in the warm-up round.

Each cell runs both engines `--repeats` times, interleaved (engine, hf, engine, hf, ... after one
warm-up of each), on the same prompts and seeds. Reported: generated tokens/s (response tokens,
end included, over the call's wall seconds; the two engines draw different samples once a row has
ended, so each is divided by its own tokens), the median of the per-repeat ratios engine / hf
with their range, and the peak memory of the call: on CUDA `torch.cuda.max_memory_allocated`; on
the CPU the rise of this process's RSS over the call (sampled every 2 ms after `malloc_trim`,
bench_step.RssSampler). Results: docs/benchmarks.md, "Rollouts".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402

from cppo.batching import take_rows  # noqa: E402
from cppo.models import (  # noqa: E402
    TinyVLMConfig,
    build_tiny_model,
    demo_model_path,
    encode_prompts,
    generate_responses,
    load_model_and_processor,
    sample_groups,
)
from cppo.toy import make_item  # noqa: E402

LARGE = TinyVLMConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768,
                      vision_hidden_size=128, vision_depth=4, vision_heads=4, vision_intermediate_size=256,
                      image_size=448)  # fmt: skip


def build(name: str, device: str, prompts: int, seed: int):
    """(model, processor, prompt batch of `prompts` shapes questions with their images)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    items = [make_item(rng) for _ in range(prompts)]
    images = [[it.image] for it in items]
    if name == "demo":
        model, processor = load_model_and_processor(demo_model_path())
    else:
        model, processor = build_tiny_model(LARGE, seed=seed)
        images = [[im.resize((448, 448))] for [im] in images]
    model = model.to(device).eval()
    batch = encode_prompts(processor, [it.question for it in items], images)
    return model, processor, batch


def end_bias(model, processor, batch, cap: int) -> None:
    """Give the output head a bias on `<|im_end|>` so that it ends a response with probability about
    3 / cap per token: log(p / (1 - p) · S), S the mean softmax denominator over the other tokens at
    the prompts' last position (random logits change little from token to token)."""
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        logits = model(**{k: v.to(model.device) for k, v in batch.items()}, logits_to_keep=1).logits[:, -1]
        others = torch.cat([logits[:, :end], logits[:, end + 1 :]], 1).float()
        S = float(others.exp().sum(1).mean())
        p = min(0.5, 3.0 / cap)
        head = model.lm_head
        biased = torch.nn.Linear(head.in_features, head.out_features, bias=True, device=model.device)
        biased.weight = head.weight
        biased.bias.zero_()
        biased.bias[end] = math.log(p / (1 - p) * S) - float(logits[:, end].mean())
    model.lm_head = biased


def one_call(
    engine: str, model, processor, batch, G: int, cap: int, seeds: list[int], decode: str = "dynamic"
):
    """(generated tokens, seconds, peak bytes, lengths) of one rollout call of `engine`."""
    kw = dict(max_new_tokens=cap, temperature=1.0, seeds=seeds)
    cuda = model.device.type == "cuda"
    bench_step.trim_memory()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss = bench_step.RssSampler()
    base_rss = rss.proc.memory_info().rss
    with rss:
        t0 = time.perf_counter()
        if engine == "engine":
            ids, mask = sample_groups(model, processor, batch, G, decode=decode, **kw)
        else:
            repeated = [b for b in range(len(seeds)) for _ in range(G)]
            rows = take_rows(batch, repeated, model.config.image_token_id)
            ids, mask = generate_responses(model, processor, rows, **kw)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    lengths = (torch.where(mask, cols, -1).amax(1) + 1).tolist()
    peak = torch.cuda.max_memory_allocated() - base if cuda else rss.peak - base_rss
    return sum(lengths), seconds, peak, lengths


def cell(model, processor, batch, G: int, cap: int, repeats: int, seed: int, decode: str = "dynamic") -> dict:
    seeds = [seed * 1000 + b for b in range(batch["input_ids"].shape[0])]
    runs = {"engine": [], "hf": []}
    for r in range(repeats + 1):  # the first round warms both up and is not counted
        for engine in ("engine", "hf") if r % 2 == 0 else ("hf", "engine"):
            out = one_call(engine, model, processor, batch, G, cap, seeds, decode)
            if r > 0:
                runs[engine].append(out)
    tps = {e: [tokens / seconds for tokens, seconds, _, _ in runs[e]] for e in runs}
    ratios = [a / b for a, b in zip(tps["engine"], tps["hf"])]
    lengths = runs["engine"][0][3]
    return {
        "G": G,
        "cap": cap,
        "rows": len(lengths),
        "tokens_per_s": {e: statistics.median(v) for e, v in tps.items()},
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "peak_mib": {e: statistics.median(p for _, _, p, _ in runs[e]) / 2**20 for e in runs},
        "lengths": {"median": statistics.median(lengths), "max": max(lengths), "min": min(lengths)},
    }


def row(name: str, image_tokens: int, c: dict) -> str:
    """One markdown table row of a cell's results."""
    ln, tps, mib, (lo, hi) = c["lengths"], c["tokens_per_s"], c["peak_mib"], c["ratio_range"]
    return (
        f"| {name} | {image_tokens} | {c['G']} | {c['cap']} | {c['rows']} | {ln['median']:.0f} "
        f"[{ln['min']}-{ln['max']}] | {tps['engine']:.0f} | {tps['hf']:.0f} | "
        f"{c['ratio']:.2f}x [{lo:.2f}-{hi:.2f}] | {mib['engine']:.0f} / {mib['hf']:.0f} |"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["demo", "large"], choices=["demo", "large"])
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[5, 8])
    parser.add_argument("--caps", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--prompts", type=int, default=4, help="B prompts a call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--decode",
        default="dynamic",
        choices=["dynamic", "static", "cuda-graphs"],
        help="the engine's decode (cuda-graphs: CUDA only; --rollout-engine cppo-graphs)",
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.device}, "
          f"{torch.get_num_threads()} threads, engine decode {args.decode}", flush=True)  # fmt: skip
    print("| model | image tokens | G | cap | rows | lengths median [min-max] | engine tok/s | hf tok/s "
          "| engine / hf, median [range] | peak MiB engine / hf |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for name in args.models:
        model, processor, batch = build(name, args.device, args.prompts, args.seed)
        image_tokens = int((batch["input_ids"][0] == model.config.image_token_id).sum())
        for cap in args.caps:
            if name == "large":
                end_bias(model, processor, batch, cap)
            for G in args.group_sizes:
                c = cell(model, processor, batch, G, cap, args.repeats, args.seed, args.decode)
                results.append({"model": name, "image_tokens": image_tokens, **c})
                print(row(name, image_tokens, c), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "decode": args.decode, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
