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


def steps_per_epoch(cfg: TrainConfig, num_samples: int) -> float:
    """Steps one pass over `num_samples` takes: num_samples / B on one stream, floor(num_samples / B)
    with drop_last (verl: len(train_dataloader) with drop_last=True; cppo.rl.sampler)."""
    B = cfg.prompts_per_step
    return num_samples // B if cfg.drop_last else num_samples / B


def resolve_max_steps(cfg: TrainConfig, num_samples: int) -> bool:
    """Set max_steps from epochs once the data is known: epochs x steps_per_epoch, rounded up (the
    official verl trainer: total_training_steps = len(train_dataloader) x total_epochs, 150 for the
    paper's 38,870 samples). True when it did; False (nothing changed) when max_steps is set.
    ConfigError when drop_last leaves no full step."""
    if cfg.drop_last and num_samples < cfg.prompts_per_step:
        raise ConfigError(
            f"drop_last: the {num_samples} training samples make no full step of {cfg.prompts_per_step} "
            "prompts: lower --prompts-per-step, or --no-drop-last to draw across epochs"
        )
    if cfg.max_steps is not None:
        return False
    cfg.max_steps = max(1, math.ceil(round(cfg.epochs * steps_per_epoch(cfg, num_samples), 6)))
    return True
