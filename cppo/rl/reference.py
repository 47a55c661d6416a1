"""The frozen reference model of the KL term (beta > 0): how it is built, where it lives, and how its
passes keep several processes in step.

    ref = build_reference(policy, compute_dtype)                 # a frozen copy, compute dtype
    ref = place_reference(ref, device, sharded, compute, offload) # sharded / kept in CPU memory
    with reference_on(ref, device):                              # the step's reference pass
        ro.ref_logp = rollout_logprobs(ref, ro, cfg)

It is a copy of the starting policy in the compute dtype (bf16 on CUDA: 2 bytes per parameter),
never updated (docs/method.md §3: k3 to a frozen reference).

- Under FSDP it is sharded like the policy (`cppo.rl.fsdp.shard_reference`): one unit per decoder
  layer and per vision block plus the root, the same MixedPrecisionPolicy, so each of K processes
  holds 1/K of it (3B: 7.0 GiB unsharded, 0.9 GiB on each of 8 GPUs). It is never whole on any
  process: `build_reference` copies the policy while that is still an empty (meta-device) skeleton,
  and after sharding rank 0 sends each process its shards of the starting weights, cast to the
  compute dtype (cppo.rl.policy.build_policy, cppo.rl.fsdp.fill_from_rank0). Its units are resharded after
  every forward: a frozen model has no backward, which is where gathered weights would be freed.
  Sharded, its passes are collectives, and they stay in step as the policy's do (cppo.rl.update,
  "FSDP: how ranks stay in step"): `rollout_logprobs` scores every process's rows in micro-batches,
  and every process holds as many rows (N/K), so as many passes; each pass runs the vision blocks,
  on a blank image when its rows have none (`run_vision` in cppo.response_stats).
- `--ref-offload` keeps its weights in CPU memory on a CUDA run. Unsharded, they are pinned once
  and copied to the GPU for the step's reference pass only (`reference_on`), then dropped: the host
  copy is kept, nothing is copied back. Sharded, each unit's shard stays in CPU memory and is
  copied to the GPU when the unit is gathered (FSDP's CPUOffloadPolicy; the policy's
  `fsdp_offload_params` offloads the reference too). Either way the passes run on the GPU: the
  reference's weights leave GPU memory during generation (the KV cache) and the update
  (activations), at the price of one host-to-device copy of them per step (unsharded) or per
  micro-batch (sharded). Running the reference on the CPU instead would cost a CPU forward over a
  step's tokens: ~400k per GPU at the paper's scale, 2.5 PFLOP at 3B, tens of minutes at a CPU's
  1-2 TFLOP/s (estimated). On a CPU run everything is in CPU memory already and the option changes
  nothing.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from cppo.models import load_model_and_processor
from cppo.rl.fsdp import shard_reference


def build_reference(policy, compute_dtype: torch.dtype, base: str | Path | None = None):
    """A frozen copy of the starting policy in `compute_dtype`, in eval mode: `policy` copied, or
    the model at `base` loaded on the policy's device (when the policy was loaded from a checkpoint,
    so no longer the start). Call before the policy is sharded or wrapped. A policy on the meta
    device (FSDP's skeleton) gives a reference on the meta device, filled once sharded."""
    if base is not None:
        device = next(policy.parameters()).device
        ref = load_model_and_processor(base, device, compute_dtype)[0]
    else:
        ref = copy.deepcopy(policy).to(compute_dtype)
    return ref.eval().requires_grad_(False)


def place_reference(ref, device: torch.device, sharded: bool, compute_dtype: torch.dtype, offload: bool):
    """Shard `ref` over the processes (`sharded`, a collective set-up), and/or keep its weights in
    CPU memory (`offload`, CUDA only: module docstring); returns it."""
    if sharded:
        return shard_reference(ref, device, compute_dtype, offload)
    if offload and device.type == "cuda":
        keep_on_host(ref)
    return ref


def _tensors(module) -> list[torch.Tensor]:
    """Every parameter and buffer of `module`, each once (a tied weight is one tensor)."""
    seen, out = set(), []
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def keep_on_host(ref) -> None:
    """Move `ref`'s weights to CPU memory (pinned when CUDA is there, for fast copies) and mark it
    so that `reference_on` copies them to the device around its passes."""
    ref.to("cpu")
    tensors = _tensors(ref)
    if torch.cuda.is_available():
        for t in tensors:
            t.data = t.data.pin_memory()
    ref._cppo_host = [t.data for t in tensors]


@contextlib.contextmanager
def reference_on(ref, device: torch.device):
    """Inside the block, a reference kept on the host (`keep_on_host`) has its weights on `device`;
    after it they are the host tensors again (the device copies are dropped, none is copied back).
    Anything else (a reference on the device, a sharded one) is left as it is."""
    host = getattr(ref, "_cppo_host", None)
    if host is None or torch.device(device).type == "cpu":
        yield ref
        return
    tensors = _tensors(ref)
    try:
        for t in tensors:
            t.data = t.data.to(device, non_blocking=True)
        yield ref
    finally:
        for t, h in zip(tensors, host):
            t.data = h
