"""What cppo-train checks and settles once it knows the launch or the data: `check_launch` (the
process count, FSDP, the device, the options the loop does not run) and `resolve_max_steps` (the
run length from --epochs once the samples are counted)."""

from __future__ import annotations

import math

import torch

from cppo.rl.config import ConfigError, TrainConfig
from cppo.rl.trackers import check_installed


def check_launch(cfg: TrainConfig, world: int = 1, sharded: bool = False) -> None:
    """What cppo-train's loop needs beyond a valid config, checked before any model loads: the
    trackers of --report-to (installed), the process count and FSDP (``sharded``) of this launch, a
    CUDA device that this torch does not see, and the options of cppo.loss / cppo.detect that the loop
    does not wire in (they need the views' hidden states, which the loop does not keep)."""
    check_installed(cfg)  # a tracker of --report-to that is not installed: the extra to install
    errors = []
    if cfg.prompts_per_step % world:
        errors.append(
            f"{cfg.prompts_per_step} prompts per step cannot be shared by {world} processes: set "
            f"--prompts-per-step to a multiple of {world}"
        )
    if sharded and cfg.lora_r:
        errors.append("LoRA is not supported with FSDP: set --lora-r 0, or launch without the FSDP config")
    if cfg.cpl_divergence == "full":
        errors.append(
            "cpl_divergence full is offered by cppo.loss.contrastive_perception_loss_full for other "
            "trainers; cppo-train supports k1|k2|k3: set --cpl-divergence k3"
        )
    if cfg.selector == "kl_shift":
        errors.append(
            "selector kl_shift is offered by cppo-detect; cppo-train ranks by entropy shift: set "
            "--selector relative (or raw, entropy)"
        )
    if cfg.device == "cuda" and not torch.cuda.is_available():  # never train on the CPU instead, silently
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        errors.append(
            f"device cuda: this torch ({torch.__version__}, {build}) sees no CUDA device: use --device cpu "
            "(or auto), or run where a GPU is visible"
        )
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError("cannot train this config: " + "; ".join(errors))


def resolve_max_steps(cfg: TrainConfig, num_samples: int) -> bool:
    """Set max_steps from epochs once the data is known: the steps that draw epochs x num_samples
    prompts, B a step, rounded up. True when it did; False (nothing changed) when max_steps is set."""
    if cfg.max_steps is not None:
        return False
    cfg.max_steps = max(1, math.ceil(round(cfg.epochs * num_samples, 6) / cfg.prompts_per_step))
    return True
