"""The policy a run trains, and its frozen reference: loaded (float32 master weights, the reference
in the compute dtype), with LoRA, a frozen vision tower and gradient checkpointing as the config
asks; under FSDP built on the meta device, sharded, and filled from rank 0's one read.

    model, processor, ref = build_policy(cfg, device, resume_from=ckpt, fsdp=settings)

Split from cppo/rl/run.py, whose `setup_run` calls it: everything about which weights a run starts
from and in which precision they live, apart from the set-up order of the run itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cppo.models import demo_model_path, load_model_and_processor, load_processor
from cppo.models.build import meta_model
from cppo.models.model_dir import ModelError
from cppo.precision import resolve_dtype
from cppo.rl.config import ConfigError, TrainConfig
from cppo.rl.fsdp import FSDPSettings, fill_from_rank0, shard_policy
from cppo.rl.reference import build_reference, place_reference
from cppo.rl.sharded import is_sharded_checkpoint


def use_gradient_checkpointing(cfg: TrainConfig, device: torch.device) -> bool:
    """`--gradient-checkpointing` resolved: auto is on with CUDA, off on the CPU (the memory it
    saves matters on a GPU; on the CPU it costs time for memory there is: docs/benchmarks.md)."""
    if cfg.gradient_checkpointing == "auto":
        return device.type == "cuda"
    return bool(cfg.gradient_checkpointing)


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The precision the forwards run in (`--dtype`; auto = bf16 on CUDA, fp32 on the CPU)."""
    return resolve_dtype(cfg.dtype, device)


def master_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype of the trainable parameters, their gradients and the optimizer state: float32 (the
    master weights, cppo.precision), or the compute dtype under the explicit --pure-bf16."""
    if not cfg.pure_bf16:
        return torch.float32
    if compute_dtype(cfg, device) != torch.bfloat16:
        raise ConfigError("pure_bf16 needs bfloat16 compute: set --dtype bfloat16 (or drop --pure-bf16)")
    return torch.bfloat16


def build_policy(
    cfg: TrainConfig, device: torch.device, resume_from: Path | None = None, fsdp: FSDPSettings | None = None
):
    """(policy, processor, frozen reference or None) as the config asks.

    The policy is loaded in float32 whatever the checkpoint was saved in (master weights; the
    forwards run in the compute dtype under autocast), the frozen reference in the compute dtype.
    With `resume_from`, a full finetune loads the checkpoint's weights through `from_pretrained`
    (transformers maps the saved key names back; a raw `load_state_dict` of the files does not fit),
    and a LoRA run builds the same adapter on the base model, then loads `resume_from/adapter`. A
    sharded checkpoint (an FSDP run's, cppo.rl.sharded) starts from the base model: `restore` loads
    its shards once the policy is built (and sharded, under FSDP). With `fsdp` (FSDP settings, more
    than one process) the policy and the reference come back sharded (`_build_sharded`)."""
    base = cfg.model or demo_model_path()
    full_resume = resume_from is not None and not cfg.lora_r and not is_sharded_checkpoint(resume_from)
    start = resume_from if full_resume else base
    if fsdp is not None:
        return _build_sharded(cfg, device, fsdp, start, base if full_resume else None)
    try:  # weights that do not fit the config are found only by loading them: one line, not a traceback
        model, processor = load_model_and_processor(start, device, master_dtype(cfg, device))
        ref = None
        if cfg.beta > 0:  # a frozen copy of the starting policy (docs/method.md §3: k3 to a frozen reference)
            ref = build_reference(model, compute_dtype(cfg, device), base=base if full_resume else None)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    _train_settings(model, cfg, device)
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        try:
            model = get_peft_model(
                model,
                LoraConfig(
                    r=cfg.lora_r,
                    lora_alpha=cfg.lora_alpha,
                    lora_dropout=cfg.lora_dropout,
                    target_modules=list(cfg.lora_targets),
                ),
            )
        except ValueError as e:  # peft's NoMatchingPeftModuleError: no module has those names
            raise ConfigError(
                f"lora_targets {list(cfg.lora_targets)} match no module of the model ({e}); "
                "name linear layers it has, e.g. q_proj k_proj v_proj o_proj"
            ) from None
        if resume_from is not None:
            _load_adapter(model, Path(resume_from))
    return model, processor, ref


def _train_settings(model, cfg: TrainConfig, device: torch.device) -> None:
    """The vision tower frozen (--freeze-vision) and activations recomputed (--gradient-checkpointing)."""
    if cfg.freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    if use_gradient_checkpointing(cfg, device):
        enable_gradient_checkpointing(model)


def _build_sharded(cfg: TrainConfig, device: torch.device, fsdp: FSDPSettings, start, ref_base):
    """`build_policy` under FSDP: (policy, processor, reference or None), sharded, the weights read once.

    Every process builds the models on the meta device (no memory) and shards them; rank 0 then
    loads `start` into CPU memory (`ref_base` too, one after the other, when the reference starts
    elsewhere: a resumed full checkpoint) and sends each process its shards (cppo.rl.fsdp:
    `fill_from_rank0`). Loading as one process does would put the whole float32 model on every
    device before sharding, and a reference copy beside it (30 GB per GPU at 3B), and one full copy
    per process in host memory."""
    compute, master = compute_dtype(cfg, device), master_dtype(cfg, device)
    try:
        model = meta_model(start, master)
        ref = None
        if cfg.beta > 0:  # the policy's skeleton copied, or the base's
            ref = build_reference(model if ref_base is None else meta_model(ref_base, compute), compute)
        processor = load_processor(start)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    _train_settings(model, cfg, device)
    if fsdp.activation_checkpointing and not use_gradient_checkpointing(cfg, device):
        enable_gradient_checkpointing(model)
    model = shard_policy(model, fsdp, device, compute)
    if ref is not None:  # shard_reference, and offloaded with the policy or --ref-offload
        ref = place_reference(ref, device, True, compute, cfg.ref_offload or fsdp.offload_params)

    def read(path, dtype):
        return lambda: load_model_and_processor(path, "cpu", dtype)[0]

    try:
        if ref is None or ref_base is None:  # the reference starts from the policy's weights
            fill_from_rank0([model] + ([ref] if ref is not None else []), read(start, master), device)
        else:
            fill_from_rank0([model], read(start, master), device)
            fill_from_rank0([ref], read(ref_base, compute), device)
    except ModelError as e:  # rank 0's (the others raise RuntimeError naming it)
        raise ConfigError(str(e)) from None
    return model, processor, ref


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant: works with FSDP2 and several forwards).
    transformers 5.x names it activation_checkpointing_enable (the old name warns)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _load_adapter(model, ckpt: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = ckpt / "adapter" / "adapter_model.safetensors"
    if not path.is_file():
        raise ConfigError(
            f"{ckpt} has no adapter/adapter_model.safetensors: it is not from a LoRA run (--lora-r 0)"
        )
    result = set_peft_model_state_dict(model, load_file(path))
    if result.unexpected_keys:
        raise ConfigError(
            f"{path}: {len(result.unexpected_keys)} adapter weights do not fit this LoRA config"
        )
