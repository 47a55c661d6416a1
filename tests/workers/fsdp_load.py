"""Run by tests/test_fsdp_load.py under `torchrun` with the FSDP environment (two CPU processes):
build the policy as cppo-train does under FSDP (`build_policy(..., fsdp=...)`: rank 0 reads the
weights, the other rank builds on the meta device and receives its shards) and record, on each rank:

- memory: the peak resident set during the build above what the process held before (VmHWM after
  a reset, minus VmRSS), for the policy alone, for the policy and a reference, and for the build as
  one process does it (every rank loads the whole model, then shards it: the way before);
- weights: the sharded policy and reference gathered, with the plain load's weights (to compare),
  logits of one image prompt through the sharded policy and the plain model, whether the output
  head is still tied to the embeddings, and the generation configs;
- a resume from a full checkpoint: the policy holds the checkpoint's weights, the reference the base's;
- what each rank raises when rank 0 cannot load the weights (BAD_DIR: weights that do not fit its
  config, found only by loading them).

torchrun --nproc_per_node 2 tests/workers/fsdp_load.py OUT_PREFIX BASE_DIR CHECKPOINT_DIR BAD_DIR
writes OUT_PREFIX.rank{R}.pt.
"""

import ctypes
import gc
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ddp_train import exit_now
from PIL import Image

from cppo.models import load_model_and_processor
from cppo.models.build import meta_model
from cppo.rl.flags import parse_args
from cppo.rl.fsdp import FSDPSettings, full_model_state, is_sharded, shard_policy
from cppo.rl.policy import build_policy
from cppo.rl.reporting import peak_memory_mb, reset_peak_memory
from cppo.rl.run import process_info

CPU = torch.device("cpu")


def rss_mb() -> float:
    """This process's resident set now, in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def release() -> None:
    """Hand freed memory back to the system, so that the next build's peak starts from what is held."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    dist.barrier()


def peak_increase(build) -> float:
    """MiB the resident set rose to during `build()` above the resident set before it; what `build`
    returns is dropped before returning."""
    release()
    before = rss_mb()
    reset_peak_memory(CPU)
    out = build()
    peak = peak_memory_mb(CPU) - before
    del out
    release()
    return peak


def the_way_before(cfg):
    """Every process loads the whole policy onto its device, then shards it (before this change)."""
    model, _, _ = build_policy(cfg, CPU)
    return shard_policy(model, FSDPSettings(), CPU)


def logits(model, processor) -> torch.Tensor:
    """(1, L, V) logits of one prompt with a 112 px image."""
    pixels = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    text = "<|vision_start|><|image_pad|><|vision_end|>How many shapes are there?"
    inputs = processor(text=[text], images=[Image.fromarray(pixels)], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def main(prefix: str, base: str, ckpt: str, bad: str) -> None:
    torch.set_num_threads(1)
    cfg = parse_args(["--model", base, "--beta", "0"])
    rank, world, _ = process_info(cfg)
    assert world == 2, f"{world} processes"
    with_ref = parse_args(["--model", base, "--beta", "0.01"])
    fsdp = FSDPSettings()
    meta_model(base)  # the model classes imported before anything is measured
    out = {
        "policy_mb": peak_increase(lambda: build_policy(cfg, CPU, fsdp=fsdp)),
        "policy_and_reference_mb": peak_increase(lambda: build_policy(with_ref, CPU, fsdp=fsdp)),
        "before_mb": peak_increase(lambda: the_way_before(cfg)),
    }

    model, processor, ref = build_policy(with_ref, CPU, fsdp=fsdp)
    plain = load_model_and_processor(base)[0]
    out["sharded"] = is_sharded(model) and is_sharded(ref)
    out["policy"] = full_model_state(model, every_rank=True)
    out["reference"] = full_model_state(ref, every_rank=True)
    out["plain"] = plain.state_dict()
    out["buffers"] = {k: v.clone() for k, v in model.named_buffers()}
    out["plain_buffers"] = {k: v.clone() for k, v in plain.named_buffers()}
    out["logits"], out["plain_logits"] = logits(model, processor), logits(plain, processor)
    out["tied"] = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    out["generation"] = (model.generation_config.to_dict(), plain.generation_config.to_dict())
    del model, ref

    model, _, ref = build_policy(with_ref, CPU, resume_from=Path(ckpt), fsdp=fsdp)
    out["resumed_policy"] = full_model_state(model, every_rank=True)
    out["resumed_reference"] = full_model_state(ref, every_rank=True)
    out["checkpoint"] = load_model_and_processor(ckpt)[0].state_dict()
    del model, ref

    try:
        build_policy(parse_args(["--model", bad, "--beta", "0"]), CPU, fsdp=fsdp)
    except Exception as e:  # rank 0's own error; the other rank's naming it
        out["bad"] = (type(e).__name__, str(e))
    torch.save(out, f"{prefix}.rank{rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:5])
    exit_now()
