"""Gradient checkpointing on and off: one CPPO update's time and memory, fresh processes, interleaved.

    python bench/bench_checkpointing.py                      # CPU: hidden 512, 4 layers, 8 x 384 tokens
    python bench/bench_checkpointing.py --device cuda --size 3b --max-new-tokens 1024 --micro 4

`cppo-train --gradient-checkpointing auto` (the default) turns it on with CUDA and off on the CPU;
this measures what that choice trades. Each repeat starts one fresh process per setting (in
alternating order), which builds the model (`bench_step.build_model`: fixed-length responses, no
end token), collects one step's CPPO rollouts, runs the reference log-probs and the policy update
once as a warm-up, then once measured (`bench_step.run_variant("cppo", ...)`: CPPO's anchor, I-
and I+ passes alive before one backward per micro-batch, as the trainer runs them). Reported per
setting, median over repeats: the update's seconds, and its memory: on CUDA the peak allocated
during the measured phase and its rise over the memory before it; on the CPU the peak resident set
(psutil, every 2 ms, after `malloc_trim`) and its rise. Ratios on/off are taken per repeat.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (bench/ is not a package)

from cppo.rl.policy import enable_gradient_checkpointing  # noqa: E402


def one(args) -> dict:
    """Warm-up, then one measured reference + update phase, in this process."""
    policy, processor, ref, start_state, samples = bench_step.setup(args)
    if args.one == "on":
        enable_gradient_checkpointing(policy)
    ro, _, _ = bench_step.rollouts(policy, processor, samples, args, "cppo", args.seed)
    bench_step.fake_advantages(ro, args.group, args.seed)
    bench_step.run_variant("cppo", policy, start_state, ref, ro, args)  # warm-up
    bench_step.trim_memory()
    tokens = bench_step.tokens_of(ro)
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        timer, _ = bench_step.run_variant("cppo", policy, start_state, ref, ro, args)
        peak = torch.cuda.max_memory_allocated()
    else:
        with bench_step.RssSampler() as s:
            base = s.peak
            timer, _ = bench_step.run_variant("cppo", policy, start_state, ref, ro, args)
        peak = s.peak
    return {
        "update_s": timer["update"],
        "peak_mb": peak / 2**20,
        "rise_mb": (peak - base) / 2**20,
        "tokens": tokens,
        "rows": ro.num_rows,
    }


def _child(args, setting: str) -> dict:
    argv = [a for a in sys.argv[1:] if a != "--json" and not a.endswith(".json")]
    cmd = [sys.executable, __file__, *argv, "--one", setting]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = bench_step.parser()
    p.description = __doc__.splitlines()[0]
    p.set_defaults(hidden=512, layers=4, prompts=2, group=4, micro=8, mini=8, max_new_tokens=384, repeats=3)
    p.add_argument("--one", choices=("on", "off"), default=None, help="(internal) one setting, this process")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        print(json.dumps(one(args)))
        return 0
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for r in range(args.repeats):
        for setting in ("off", "on") if r % 2 == 0 else ("on", "off"):
            runs[setting].append(_child(args, setting))
            print(f"repeat {r + 1} {setting}: {json.dumps(runs[setting][-1])}", flush=True)
    med = {s: {k: statistics.median(x[k] for x in v) for k in v[0]} for s, v in runs.items()}
    time_ratio = statistics.median(a["update_s"] / b["update_s"] for a, b in zip(runs["on"], runs["off"]))
    rise_ratio = statistics.median(a["rise_mb"] / b["rise_mb"] for a, b in zip(runs["on"], runs["off"]))
    where = "CUDA allocated" if torch.device(args.device).type == "cuda" else "CPU resident set"
    print(f"\n{med['off']['rows']} rows x {med['off']['tokens'] / med['off']['rows']:.0f} tokens, "
          f"hidden {args.hidden}, {args.layers} layers, micro-batch {args.micro}, {args.device}; "
          f"median of {args.repeats}; memory: {where}")  # fmt: skip
    print("| gradient checkpointing | update s | peak MiB | rise during the update, MiB |")
    print("|---|---|---|---|")
    for s in ("off", "on"):
        m = med[s]
        print(f"| {s} | {m['update_s']:.2f} | {m['peak_mb']:.0f} | {m['rise_mb']:.0f} |")
    print(f"\non/off: update time x{time_ratio:.2f}, memory rise x{rise_ratio:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "median": med, "time_ratio": time_ratio,
                                               "rise_ratio": rise_ratio}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
