"""FSDP2 sharding of the policy, switched on by an accelerate config.

    accelerate launch --config_file examples/accelerate/fsdp2.yaml -m cli.train --max-steps 100

`accelerate launch` with `distributed_type: FSDP` exports ACCELERATE_USE_FSDP=true and the config's
fields as FSDP_* environment variables; `fsdp_settings()` reads those (so `torchrun` with the same
variables does the same). The policy is sharded with torch's `fully_shard` (FSDP2): one unit per
decoder layer and per vision block, and the root unit for the rest (embeddings, the tied output
head, norms, the patch embedding and merger). Fields honoured: `fsdp_version` (2 is required),
`fsdp_reshard_after_forward`, `fsdp_offload_params` (CUDA only), `fsdp_activation_checkpointing`.
Precision is the trainer's, not the accelerate config's: the sharded parameters (the master weights),
their gradients and the optimizer state are float32; under bf16 compute (`--dtype`, bf16 on CUDA)
each unit all-gathers its parameters in bf16 and reduce-scatters gradients in float32
(`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, as verl and EasyR1 shard), and the
forwards also run under autocast (cppo.precision).

What changes in the loop, and why:
- The trainer never calls the root's `forward` to score: it runs the backbone and the output head
  itself (cppo.response_stats, head on response positions only), registered as an FSDP forward
  method (`register_fsdp_forward_method`), so the root's parameters are gathered around it and its
  gradients reduce-scattered after the backward, as for `forward`.
- FSDP averages gradients over processes; the loop's hand-written all-reduce sums them (each
  micro-batch loss is scaled by its share of the GLOBAL mini-batch). Under FSDP the reduction is
  set to a sum too (`set_gradient_divide_factor(1.0)`), so the same scaling gives the same update.
- Every rank issues the same sharded forwards in every micro-batch, whatever its rows (how:
  cppo.rl.update's module docstring).
- Generation gathers every unit once and keeps it gathered until `generate` returns, instead of one
  all-gather per layer per new token; it then issues no collective (cppo.models.generate_responses).
  `generate` is not registered as a forward method: its per-token `forward` calls would nest in it,
  and the outer post-forward reshards the root whatever `reshard_after_forward` says, so that the
  next call inside `gathered` all-gathered the root once per new token.
- Checkpoints are sharded (cppo.rl.sharded: each process writes its own shards of the weights and
  the optimizer state with torch.distributed.checkpoint); the run's last checkpoint also holds the
  gathered `from_pretrained` weights. A run resumes with another number of processes, or without FSDP.
- The frozen reference model (beta > 0) is sharded the same way (`shard_reference`; where it lives
  and how its passes keep the ranks in step: cppo.rl.reference).
- The weights are read once, by rank 0, into CPU memory; every process builds the model on the meta
  device, shards it, and receives its shards from rank 0 (`fill_from_rank0`), the reference too. No
  process holds a full copy on its device, and only rank 0 one in host memory (cppo.rl.policy.build_policy).
- LoRA is not supported together with FSDP here (the trainer says so).
"""

from __future__ import annotations

import contextlib
import os
import types
from dataclasses import dataclass

import torch

from cppo.response_stats import plain_response_stats
from cppo.rl.config import ConfigError

_TRUE = {"1", "true", "yes", "y", "on", "full_shard"}


@dataclass(frozen=True)
class FSDPSettings:
    reshard_after_forward: bool = True
    offload_params: bool = False
    activation_checkpointing: bool = False


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in _TRUE


def fsdp_settings() -> FSDPSettings | None:
    """The FSDP settings an accelerate config exported to this process, or None without FSDP."""
    if not _flag("ACCELERATE_USE_FSDP", False):
        return None
    version = os.environ.get("FSDP_VERSION", "1")
    if version.strip() != "2":
        raise ConfigError(
            f"the accelerate config asks for FSDP version {version}; cppo-train shards with FSDP2: "
            "set fsdp_version: 2 in the config (accelerate config / --fsdp_version 2)"
        )
    return FSDPSettings(
        reshard_after_forward=_flag("FSDP_RESHARD_AFTER_FORWARD", True),
        offload_params=_flag("FSDP_OFFLOAD_PARAMS", False),
        activation_checkpointing=_flag("FSDP_ACTIVATION_CHECKPOINTING", False),
    )


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _units(model) -> list[torch.nn.Module]:
    """The modules that become their own FSDP unit: decoder layers and vision blocks."""
    backbone = model.model
    return [*backbone.language_model.layers, *backbone.visual.blocks]


def shard_policy(
    model, settings: FSDPSettings, device: torch.device, compute_dtype: torch.dtype = torch.float32
):
    """Shard `model` in place with FSDP2 over all processes; returns it (now an FSDPModule).

    Parameters keep their dtype in the shards (float32 master weights); `compute_dtype` other than
    float32 all-gathers them in that dtype and reduces gradients in float32. Call before building
    the optimizer (its parameters become DTensor shards)."""

    if settings.offload_params and device.type != "cuda":
        raise ConfigError("fsdp_offload_params needs CUDA: set fsdp_offload_params: false in the config")
    _shard(model, settings.reshard_after_forward, settings.offload_params, device, compute_dtype)
    for unit in [*_units(model), model]:  # each unit's own setting
        unit.set_gradient_divide_factor(1.0)  # a sum over processes, as the loop's own all-reduce
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM collective (gloo has no PREMUL_SUM)
    return model


def shard_reference(
    ref, device: torch.device, compute_dtype: torch.dtype = torch.float32, offload: bool = False
):
    """Shard the frozen reference in place as `shard_policy` shards the policy (the same units, the
    same MixedPrecisionPolicy); returns it. It is resharded after every forward whatever the
    policy's setting: it has no backward, which is where a unit kept gathered would be freed.
    `offload` (CUDA only; ignored on the CPU, where everything is in CPU memory already) keeps the
    shards in CPU memory and copies each unit to the device when it is gathered."""
    _shard(ref, True, offload and device.type == "cuda", device, compute_dtype)
    return ref


def _shard(model, reshard_after_forward: bool, offload: bool, device, compute_dtype) -> None:
    """fully_shard every unit, then the root; register the trainer's forward (response_stats)."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    kw = {"reshard_after_forward": reshard_after_forward}
    if compute_dtype != torch.float32:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    for unit in _units(model):
        fully_shard(unit, **kw)
    fully_shard(model, **kw)
    model._cppo_reshard_after_forward = reshard_after_forward
    model._cppo_offload = offload
    model._cppo_device = device  # where it computes: its shards may sit in CPU memory (offload)
    model.cppo_response_stats = types.MethodType(plain_response_stats, model)
    register_fsdp_forward_method(model, "cppo_response_stats")


def fill_from_rank0(models: list, read, device: torch.device) -> None:
    """Materialize `models` (built on the meta device, then sharded: `shard_policy`, `shard_reference`)
    and fill them with the weights of the model `read()` returns, called on rank 0 only (a CPU copy,
    from_pretrained). A collective: every process calls it with the same number of models.

    Parameters go out with torch's `set_model_state_dict(..., broadcast_from_rank0=True)`: one tensor
    at a time, each process keeping its shard of it, cast to the shard's dtype (the reference's
    compute dtype), so a process other than rank 0 holds its shards and one full tensor at most.
    Buffers are then broadcast from rank 0's model: the non-persistent ones (the rotary `inv_freq`
    tables, computed at construction, garbage after `to_empty`) are in no state dict, and this way
    every rank computes with rank 0's exact values (verl broadcasts them too). An error in `read()`
    (a bad checkpoint) stops every process, not rank 0 alone."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from cppo.rl.sharded import share_rank0_outcome  # cppo.rl.sharded imports this module

    loaded, failed = None, None
    if dist.get_rank() == 0:
        try:
            loaded = read()
        except Exception as e:  # raised on rank 0 after the others are told (share_rank0_outcome)
            failed = e
    share_rank0_outcome(failed, "load the model's weights")
    full = loaded.state_dict() if loaded is not None else {}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for model in models:
        offloaded = getattr(model, "_cppo_offload", False)  # FSDP wants offloaded shards on the CPU
        model.to_empty(device="cpu" if offloaded else device)  # swaps tensors: tied weights stay tied
        set_model_state_dict(model, dict(full), options=options)  # it writes into the dict it is given
        _broadcast_buffers(model, loaded, device)


def _broadcast_buffers(model, loaded, device: torch.device) -> None:
    """Every buffer of `model` placed on `device` (FSDP shards parameters only, and offloads only
    those) and set to rank 0's value from `loaded` (None on the other ranks), in `model`'s dtype."""
    import torch.distributed as dist

    source = dict(loaded.named_buffers()) if loaded is not None else {}
    with torch.no_grad():
        for prefix, module in model.named_modules():
            for name, buffer in list(module._buffers.items()):
                if buffer is None:
                    continue
                buffer = module._buffers[name] = torch.empty_like(buffer, device=device)
                if loaded is not None:
                    buffer.copy_(source[f"{prefix}.{name}" if prefix else name])
                dist.broadcast(buffer, src=0)


def compute_device(model) -> torch.device:
    """The device `model`'s forwards run on: the FSDP device of a sharded model (its parameters may
    be offloaded to the CPU), else its parameters' device."""
    device = getattr(model, "_cppo_device", None)
    return device if device is not None else next(model.parameters()).device


@contextlib.contextmanager
def gathered(model):
    """Keep every FSDP unit of `model` unsharded inside the block (no-op without FSDP): generation
    then all-gathers each unit once, not once per new token."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # FSDP2 takes the first unit to run forward as the root; transformers' `generate` runs the vision
    # blocks before the root's forward, so the root is initialised here (a no-op after the first time)
    model._get_fsdp_state()._lazy_init()
    model.set_reshard_after_forward(False, recurse=True)
    for m in modules:
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
        model.set_reshard_after_forward(_reshard_setting(model), recurse=True)


def _reshard_setting(model) -> bool:
    return getattr(model, "_cppo_reshard_after_forward", True)


def full_model_state(model, every_rank: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded weights on the CPU, on rank 0 only (other ranks get {}) unless `every_rank`.

    A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not every_rank)
    return {k: v.cpu() for k, v in get_model_state_dict(model, options=options).items()}


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """Load a full optimizer state keyed by parameter name (the checkpoints of FSDP runs before they
    were sharded) into `optimizer`, sharding it under FSDP (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )
