"""Setting a run up: processes and devices, the policy (LoRA, frozen parts, reference), the optimizer.

Split from cppo/rl/loop.py so that the loop reads top to bottom on its own.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import numpy as np
import torch

from cppo.models import demo_model_path, load_model_and_processor
from cppo.perturb import get_preset, load_preset
from cppo.precision import resolve_dtype
from cppo.rl.config import ConfigError, TrainConfig


def process_info(cfg: TrainConfig):
    """(rank, world size, device) from accelerate's process state (starts gloo/NCCL under torchrun).

    accelerate treats a CPU machine as one process unless told `cpu=True`, even under torchrun."""
    from accelerate import PartialState

    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    device = torch.device("cpu") if state.device.type == "cpu" else state.device
    return state.process_index, state.num_processes, device


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


def views_preset(name: str):
    return load_preset(name) if str(name).endswith((".yaml", ".yml")) else get_preset(name)


def build_policy(cfg: TrainConfig, device: torch.device, resume_from: Path | None = None):
    """(policy, processor, frozen reference or None) as the config asks.

    The policy is loaded in float32 whatever the checkpoint was saved in (master weights; the
    forwards run in the compute dtype under autocast), the frozen reference in the compute dtype.
    With `resume_from`, a full finetune loads the checkpoint's weights through `from_pretrained`
    (transformers maps the saved key names back; a raw `load_state_dict` of the files does not fit),
    and a LoRA run builds the same adapter on the base model, then loads `resume_from/adapter`."""
    base = cfg.model or demo_model_path()
    full_resume = resume_from is not None and not cfg.lora_r
    compute = compute_dtype(cfg, device)
    model, processor = load_model_and_processor(
        resume_from if full_resume else base, device, master_dtype(cfg, device)
    )
    ref = None
    if cfg.beta > 0:  # a frozen copy of the starting policy (docs/method.md §3: k3 to a frozen reference)
        ref = (
            load_model_and_processor(base, device, compute)[0]
            if full_resume
            else copy.deepcopy(model).to(compute)
        )
        ref.eval().requires_grad_(False)
    if cfg.freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.lora_targets),
            ),
        )
        if resume_from is not None:
            _load_adapter(model, Path(resume_from))
    return model, processor, ref


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward (non-reentrant: works with FSDP2 and several forwards)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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


def build_optimizer(model, cfg: TrainConfig, updates_total: int):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    def factor(update: int) -> float:
        if update < cfg.warmup_steps:
            return (update + 1) / cfg.warmup_steps
        progress = (update - cfg.warmup_steps) / max(1, updates_total - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_everything(seed: int) -> None:
    """Python, numpy's global generator and torch (every device) from one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (user reward code may use the global generator)
    torch.manual_seed(seed)
