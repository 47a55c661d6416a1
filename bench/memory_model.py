"""Per-GPU memory of the paper's runs (cppo.rl.memory), and a check of the model against a CPU step.

    python bench/memory_model.py                # the table in docs/training.md ("Memory")
    python bench/memory_model.py --check-cpu    # estimated vs measured update-phase memory, CPU

The table: Qwen2.5-VL-3B/7B full finetunes at the paper's settings (512 prompts x 5 per step,
4,096-token responses, 512-token prompts, bf16 compute over float32 master weights, CPPO's three
passes alive, gradient checkpointing) on 1 and 8 GPUs, for today's trainer (one generate over all
of a process's rows, a full reference per process) and with a generation batch of 64 rows and the
reference sharded.

The check: a small model (hidden 256, 4 layers) runs one GRPO update on CPU in float32 without
checkpointing; the measured rise of the process's peak resident set during the update (the
gradients, AdamW's first-step state, activations and head chunks it allocates) is compared with
the model's estimate of the same parts. Allocator slack and torch's own buffers make the
measurement larger; the model is meant to be right within a factor of two, not to the megabyte.
"""

from __future__ import annotations

import argparse
import sys

from cppo.rl.memory import GIB, SHAPES, RunShape, estimate

PARTS = ("master_weights", "gradients", "optimizer", "reference", "compute_copy", "kv_cache", "activations")


def paper_rows() -> list[tuple[str, str, RunShape]]:
    """(model, setting, run) for the table: 3B micro-batch 8, 7B micro-batch 2 (the paper's)."""
    rows = []
    for size, micro in (("3b", 8), ("7b", 2)):
        for gpus in (1, 8):
            per_gpu = 512 * 5 // gpus
            fsdp = gpus > 1
            today = RunShape(gpus=gpus, fsdp=fsdp, generate_rows=per_gpu, micro_rows=micro)
            planned = RunShape(gpus=gpus, fsdp=fsdp, generate_rows=64, micro_rows=micro, reference="sharded")
            where = f"{gpus} GPU{'s' if gpus > 1 else ''}"
            rows.append((size, f"{where}, one generate over {per_gpu} rows", today))
            rows.append((size, f"{where}, generate 64 rows, sharded ref", planned))
    return rows


def table() -> str:
    head = "| model | setting | " + " | ".join(p.replace("_", " ") for p in PARTS) + " | peak |"
    lines = [head, "|" + "---|" * (len(PARTS) + 3)]
    for size, setting, run in paper_rows():
        e = estimate(SHAPES[size], run)
        cells = " | ".join(f"{e[p] / GIB:.1f}" for p in PARTS)
        lines.append(f"| {size.upper()} | {setting} | {cells} | **{e['peak'] / GIB:.0f}** |")
    return "\n".join(lines)


def measure_cpu_update() -> tuple[float, float]:
    """(measured MiB, estimated MiB) of one GRPO update's own memory on a small model, CPU fp32."""
    import numpy as np
    import torch

    from cppo.models import TinyVLMConfig, build_tiny_model
    from cppo.perturb import get_preset
    from cppo.rl.config import TrainConfig
    from cppo.rl.data import Sample
    from cppo.rl.memory import ModelShape
    from cppo.rl.reporting import peak_memory_mb, reset_peak_memory
    from cppo.rl.rewards import RewardScorer
    from cppo.rl.rollout import collect_rollouts, prepare_prompts
    from cppo.rl.run import build_optimizer
    from cppo.rl.update import Timer, policy_update
    from cppo.toy import make_item

    torch.manual_seed(0)
    sizes = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=1024)
    model, processor = build_tiny_model(TinyVLMConfig(**sizes), seed=0)
    rows, tokens = 16, 96
    cfg = TrainConfig(
        algo="grpo", prompts_per_step=2, group_size=8, max_new_tokens=tokens, micro_batch_size=rows,
        beta=0.0, dtype="float32", logits_chunk_size=256,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    items = [make_item(rng) for _ in range(2)]
    samples = [
        Sample(index=i, question=x.question, answer=x.answer, images=[x.image]) for i, x in enumerate(items)
    ]
    ro = collect_rollouts(
        model, processor, prepare_prompts(processor, samples, [1, 2], cfg.algo, get_preset("paper")), cfg,
        RewardScorer(["format"], [1.0]),
        generator_seed=0,
    )  # fmt: skip
    ro.advantages = torch.linspace(-1, 1, ro.num_rows)
    optimizer, scheduler = build_optimizer(model, cfg, 1)
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    before = peak_memory_mb(cpu)
    policy_update(model, optimizer, scheduler, ro, cfg, Timer())
    measured = peak_memory_mb(cpu) - before
    prompt = int(ro.inputs["prompt_length"])
    run = RunShape(
        micro_rows=ro.num_rows, prompt_tokens=prompt, response_tokens=ro.response_ids.shape[1], passes=1,
        checkpointing=False, compute_bytes=4, reference="none", generate_rows=0, chunk=cfg.logits_chunk_size,
    )  # fmt: skip
    e = estimate(ModelShape.from_config(model.config), run)
    estimated = (e["gradients"] + e["optimizer"] + e["activations"] + e["head_chunk"]) / 2**20
    return measured, estimated


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check-cpu", action="store_true", help="compare the model with a measured CPU update")
    args = p.parse_args(argv)
    if args.check_cpu:
        measured, estimated = measure_cpu_update()
        print(f"update-phase memory, small model on CPU: measured {measured:.0f} MiB, "
              f"estimated {estimated:.0f} MiB (ratio {measured / estimated:.2f})")  # fmt: skip
        return 0
    print(f"GiB per GPU (3B: {SHAPES['3b'].params() / 1e9:.2f} B parameters, 7B: "
          f"{SHAPES['7b'].params() / 1e9:.2f} B)\n")  # fmt: skip
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
