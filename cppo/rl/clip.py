"""Gradient clipping by the global norm, for sharded (FSDP2) and unsharded models alike.

    norm = clip_grad_norm(params, max_norm)   # a plain tensor: the norm of ALL gradients, before clipping

Unsharded parameters: torch's `clip_grad_norm_`. FSDP2 parameters are DTensors whose gradients are
this process's shard (dim 0) of the summed gradient; with `fsdp_offload_params` those shards sit in
CPU memory. torch's clip then reduces the norm of CPU DTensors, a collective on CPU tensors that a
NCCL-only process group cannot run. Here each process reduces its local shards to ONE number
(sum of |g|^p, or max |g| for the inf-norm) where they lie, that number alone crosses processes in
one all-reduce on the group's collective device (the GPU under NCCL, the CPU under gloo), and every
local shard is scaled in place by the same factor as torch's: min(1, max_norm / (norm + 1e-6)).

Departure from the paper's official code (verl `fsdp2_clip_grad_norm_`): verl computes the norm with
DTensor arithmetic (`_get_total_norm` on the DTensor gradients), moves it to the GPU and clips with
torch's helper; here the local shards are reduced by hand and one scalar is all-reduced, so nothing
depends on how DTensor dispatches a norm of offloaded shards. Mathematically the same norm
(tests/test_clip.py: equal to torch's on the same sharded model and to the unsharded gradients').

A non-finite gradient anywhere makes the norm nan or inf on every process (it is all-reduced; for the
inf-norm a nan is sent as inf, which a MAX all-reduce cannot drop), and the caller skips the step on
every process (cppo.rl.update.policy_update), as with torch's clip.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

from cppo.rl.ranks import collective_device

_EPS = 1e-6  # torch's clip_grad_norm_ divides by norm + 1e-6


def _sharded_group(params: list[torch.nn.Parameter]):
    """The process group the DTensor parameters are sharded over, or None when none is a DTensor.
    Decided from the parameters (not their gradients), so every process decides alike."""
    from torch.distributed.tensor import DTensor, Shard

    meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
    if not meshes:
        return None
    mesh = meshes.pop()
    if meshes or mesh.ndim != 1:
        raise ValueError(
            "clip_grad_norm supports parameters sharded over one 1-D device mesh (fully_shard over all "
            "processes): shard the whole model with one fully_shard mesh"
        )
    for p in params:
        if isinstance(p, DTensor) and not all(isinstance(s, Shard) for s in p.placements):
            raise ValueError(f"clip_grad_norm: a parameter has placements {p.placements}, expected Shard")
    return mesh.get_group()


def _local_norm_term(grads: list[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    """This process's part of the total norm, a float32 scalar on `device`: sum of |g|^p over
    `grads`, or max |g| for p = inf (0 without gradients). Reduced where the gradients lie, one
    scalar per device moved (no host sync per gradient)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    parts = [torch.zeros((), dtype=torch.float32, device=device)]
    for on_device in by_device.values():
        norms = torch.stack([torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in on_device])
        part = norms.max() if math.isinf(norm_type) else norms.pow(norm_type).sum()  # (,)
        parts.append(part.to(device))
    if math.isinf(norm_type):  # a MAX all-reduce may drop a nan (max(1, nan) = 1): send it as inf
        return torch.nan_to_num(torch.stack(parts).max(), nan=math.inf)
    return torch.stack(parts).sum()  # a SUM all-reduce keeps nan and inf


@torch.no_grad()
def clip_grad_norm(
    params: Iterable[torch.nn.Parameter], max_norm: float, norm_type: float = 2.0
) -> torch.Tensor:
    """Scale the gradients of `params` in place so that their global `norm_type`-norm is at most
    `max_norm` (inf: never scaled); returns that norm before scaling, a plain tensor (not a DTensor;
    sharded: on the collective device), the same on every process. A collective under FSDP2: every
    process calls it (module docstring)."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    group = _sharded_group(params)
    if group is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    norm_type = float(norm_type)
    grads = [p.grad for p in params if p.grad is not None]
    shards = [g.to_local() for g in grads if isinstance(g, DTensor)]  # this process's rows
    replicated = [g for g in grads if not isinstance(g, DTensor)]  # unsharded: the same on every process
    device = collective_device(group)
    term = _local_norm_term(shards, norm_type, device)
    dist.all_reduce(term, op=dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM, group=group)
    own = _local_norm_term(replicated, norm_type, device)  # counted once, not once per process
    if math.isinf(norm_type):
        total = torch.maximum(term, own)
    else:
        total = (term + own).pow(1.0 / norm_type)
    coef = (max_norm / (total + _EPS)).clamp(max=1.0)  # torch's factor, applied even when it is 1
    coefs: dict[tuple, torch.Tensor] = {}  # one copy per device and dtype (offload: one to the CPU)
    for g in [*shards, *replicated]:
        key = (g.device, g.dtype)
        if key not in coefs:
            coefs[key] = coef.to(g.device, g.dtype)
        g.mul_(coefs[key])
    return total
