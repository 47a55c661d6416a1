"""Run by tests/test_rl_fsdp.py under `torchrun` with the FSDP environment: train as ddp_train.py
does, and at every reference pass of the loop also score the same rollouts with an unsharded copy
of the reference; save both, with how much of the reference this rank holds, and what each
checkpoint save returned on this rank (the loop decides from it whether to save again).

torchrun --nproc_per_node 2 tests/workers/fsdp_reference.py OUT_FILE_PREFIX [cppo-train flags...]
writes OUT_FILE_PREFIX.rank{R}.pt (final weights), OUT_FILE_PREFIX.ref.rank{R}.pt (the passes) and
OUT_FILE_PREFIX.saves.rank{R}.pt.
"""

import sys

import torch
from ddp_train import exit_now, main

import cppo.rl.loop as loop
from cppo.models import load_model_and_processor
from cppo.rl import resume
from cppo.rl.flags import parse_args
from cppo.rl.fsdp import is_sharded

if __name__ == "__main__":
    prefix, flags = sys.argv[1], sys.argv[2:]
    plain = load_model_and_processor(parse_args(flags).model)[0].requires_grad_(False)  # float32, CPU
    real, passes = loop.rollout_logprobs, []

    def recording(model, ro, cfg, *args, **kw):
        out = real(model, ro, cfg, *args, **kw)
        if not any(p.requires_grad for p in model.parameters()):  # the reference
            params = list(model.parameters())
            local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in params)
            passes.append(
                {
                    "sharded": out,
                    "plain": real(plain, ro, cfg, *args, **kw),
                    "has_image": ro.has_image.clone(),
                    "is_sharded": is_sharded(model),
                    "local_numel": local,
                    "numel": sum(p.numel() for p in model.parameters()),
                }
            )
        return out

    loop.rollout_logprobs = recording
    real_save, saves = resume.Checkpointer.save, []

    def recording_save(self, step, sampler_state):
        saves.append((step, real_save(self, step, sampler_state)))
        return saves[-1][1]

    resume.Checkpointer.save = recording_save
    rank = main(prefix, flags)
    torch.save(passes, f"{prefix}.ref.rank{rank}.pt")
    torch.save([(step, str(path)) for step, path in saves], f"{prefix}.saves.rank{rank}.pt")
    exit_now()
