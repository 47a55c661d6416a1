"""The GRPO / CPPO / PAPO training loop, top to bottom.

    cppo-train                                  # CPPO, bundled demo model, shapes task, CPU
    cppo-train --algo grpo --max-steps 100      # the same loop without the views and the CPL term
    torchrun --nproc_per_node 2 -m cli.train    # one process per device (gloo on CPU, NCCL on GPU)

One step: B prompts -> G rollouts each (current policy, temperature) -> rewards (0.9 accuracy +
0.1 format) -> group advantages -> [old/ref log-probs when needed] -> optimizer updates over
mini-batches of micro-batches, each with PPO-clip + beta·KL(ref) + lambda·CPL (cppo/rl/update.py).
CPPO only adds the views (cppo/rl/rollout.py) and the loss term; GRPO and PAPO are the same loop.

Departures from the official code, on purpose:
- old log-probs are not recomputed when a step makes one optimizer update (on-policy: they equal
  the anchor's detached log-probs exactly), which saves a full forward pass per step;
- the I+/I- passes run only on rows that can carry CPL (METHOD.md §5.7), and the output head only on
  response positions, in chunks (§5.8);
- processes share gradients by an explicit all-reduce of their sum after each mini-batch rather
  than a DDP wrapper, because a CPPO micro-batch makes up to three forward passes of the same
  module before one backward, which DDP's hooks do not expect.
"""

from __future__ import annotations

import copy
import math
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch

from cppo.models import demo_model_path, load_model_and_processor
from cppo.perturb import get_preset, load_preset
from cppo.rl.checkpoint import (
    capture_rng,
    check_writable,
    latest_checkpoint,
    load_trainer_state,
    restore_rng,
    save_checkpoint,
)
from cppo.rl.config import ConfigError, TrainConfig
from cppo.rl.data import PromptSampler, find_split, open_dataset, shapes_data
from cppo.rl.evaluate import evaluate
from cppo.rl.rewards import RewardScorer
from cppo.rl.rollout import collect_rollouts
from cppo.rl.runlog import RunLogger, plot_curves
from cppo.rl.update import Timer, policy_update, rollout_logprobs


def _dist(cfg: TrainConfig):
    """(rank, world size, device) from accelerate's process state (starts gloo/NCCL under torchrun).

    accelerate treats a CPU machine as one process unless told `cpu=True`, even under torchrun."""
    from accelerate import PartialState

    state = PartialState(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    device = torch.device("cpu") if state.device.type == "cpu" else state.device
    return state.process_index, state.num_processes, device


def _dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.dtype)


def _preset(name: str):
    return load_preset(name) if str(name).endswith((".yaml", ".yml")) else get_preset(name)


def build_policy(cfg: TrainConfig, device: torch.device):
    """(policy, processor, frozen reference or None) as the config asks."""
    model, processor = load_model_and_processor(cfg.model or demo_model_path(), device, _dtype(cfg, device))
    if cfg.freeze_vision:
        for p in model.model.visual.parameters():
            p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = None
    if cfg.beta > 0:  # a frozen copy of the starting policy (METHOD.md §3: k3 to a frozen reference)
        ref = copy.deepcopy(model).eval().requires_grad_(False)
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
    return model, processor, ref


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (user reward code may use the global generator)
    torch.manual_seed(seed)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train(cfg: TrainConfig) -> Path:
    """Run the configured training; returns the run directory."""
    return run_training(cfg)[0]


def run_training(cfg: TrainConfig):
    """Run the configured training; returns (run directory, trained policy)."""
    rank, world, device = _dist(cfg)
    if cfg.prompts_per_step % world:
        raise ConfigError(
            f"{cfg.prompts_per_step} prompts per step cannot be shared by {world} processes: set "
            f"--prompts-per-step to a multiple of {world}"
        )
    _check_supported(cfg)
    run_dir = Path(cfg.output_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        check_writable(run_dir)
    _seed_everything(cfg.seed)
    data_path = cfg.data or shapes_data(run_dir / "shapes", seed=cfg.seed)
    dataset = open_dataset(data_path, strict=cfg.data_strict)
    model, processor, ref = build_policy(cfg, device)
    n_local = cfg.rollouts // world
    mini_local = (cfg.mini_batch_size or cfg.rollouts) // world
    updates_per_step = cfg.ppo_epochs * math.ceil(n_local / mini_local)
    optimizer, scheduler = build_optimizer(model, cfg, cfg.max_steps * updates_per_step)
    sampler = PromptSampler(len(dataset), cfg.prompts_per_step, seed=cfg.seed)
    preset = _preset(cfg.preset if cfg.algo != "papo" else cfg.papo_preset)
    scorer = RewardScorer(cfg.rewards, cfg.reward_weights)
    logger = RunLogger(run_dir, tensorboard=cfg.tensorboard, is_main=rank == 0)

    start = 0
    ckpt = latest_checkpoint(run_dir) if cfg.resume == "auto" else (Path(cfg.resume) if cfg.resume else None)
    if ckpt is not None:
        start = _resume(ckpt, model, optimizer, scheduler, sampler, logger, cfg)
    elif rank == 0:
        cfg.save(run_dir / "config.yaml")
        print(f"[cppo] {dataset.summary()}")

    eval_set = _eval_set(cfg, data_path) if cfg.eval_every else None
    progress = _progress(cfg, start, rank)
    for step in range(start, cfg.max_steps):
        timer = Timer()
        t0 = time.perf_counter()
        draws = sampler.next_batch()[rank * cfg.prompts_per_step // world :][: cfg.prompts_per_step // world]
        samples = [dataset[d.index] for d in draws]
        with timer("rollout"):
            ro = collect_rollouts(
                model,
                processor,
                samples,
                [d.view_seed for d in draws],
                cfg,
                preset,
                scorer,
                generator_seed=_rollout_seed(cfg.seed, step, rank),
                timer=timer,
                per_prompt_seeds=[d.view_seed + step for d in draws] if cfg.seed_per_prompt else None,
            )
        with timer("old_ref_logprobs"):
            if updates_per_step > 1:
                ro.old_logp = rollout_logprobs(model, ro, cfg)
            if ref is not None:
                ro.ref_logp = rollout_logprobs(ref, ro, cfg)
        metrics = policy_update(model, optimizer, scheduler, ro, cfg, timer, world_size=world)
        metrics.update(_step_metrics(ro, timer, time.perf_counter() - t0, device, world))
        if eval_set is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
            with timer("eval"):
                metrics.update(_evaluate(model, processor, eval_set, cfg))
            metrics["time/eval"] = timer["eval"]
        logger.log(step + 1, metrics)
        logger.log_rollouts(step + 1, _rollout_rows(ro, cfg.log_rollouts))
        progress.update(metrics)
        last = step + 1 == cfg.max_steps
        if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
            _save(run_dir, step + 1, model, processor, optimizer, scheduler, sampler, cfg, rank)
    progress.close()
    logger.close()
    if rank == 0 and (run_dir / "metrics.jsonl").is_file():
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    return run_dir, model


def _check_supported(cfg: TrainConfig) -> None:
    """Options of cppo.loss / cppo.detect that the loop does not wire in (they need the views' hidden
    states, which the loop does not keep)."""
    if cfg.cpl_divergence == "full":
        raise ConfigError(
            "cpl_divergence full is offered by cppo.loss.contrastive_perception_loss_full for other "
            "trainers; cppo-train supports k1|k2|k3: set --cpl-divergence k3"
        )
    if cfg.selector == "kl_shift":
        raise ConfigError(
            "selector kl_shift is offered by cppo-detect; cppo-train ranks by entropy shift: set "
            "--selector relative (or raw, entropy)"
        )


def _eval_set(cfg: TrainConfig, data_path):
    path = cfg.eval_data or find_split(data_path, "val")
    if path is None:
        raise ConfigError(
            f"eval_every is {cfg.eval_every} but no eval_data was given and {data_path} has no val split"
        )
    return open_dataset(path, split="val" if cfg.eval_data is None else "train", strict=cfg.data_strict)


def _evaluate(model, processor, dataset, cfg: TrainConfig) -> dict[str, float]:
    """avg@K accuracy and format on (at most 64 items of) the held-out set, as eval/* metrics.

    Each process grades the same items: evaluation is cheap next to a step, and it keeps every
    rank's RNG in step."""
    report = evaluate(
        model,
        processor,
        dataset,
        samples=cfg.eval_samples,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        limit=64,
        temperature=None if cfg.eval_samples == 1 else cfg.temperature,
    )
    return {"eval/accuracy": report["accuracy"], "eval/format": report["format"]}


def _rollout_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _step_metrics(ro, timer: Timer, step_time: float, device, world: int) -> dict[str, float]:
    mask = ro.response_mask
    tokens = int(mask.sum()) + int(ro.inputs["attention_mask"][:, : ro.inputs["prompt_length"]].sum())
    out = dict(ro.reward_result.metrics())
    out["response/length"] = float(mask.sum(1).float().mean())
    out["response/clipped"] = float((mask.sum(1) == mask.shape[1]).float().mean())
    out["adv/positive_frac"] = float((ro.advantages > 0).float().mean())
    for phase in ("rollout", "reward", "old_ref_logprobs", "update", "perception"):
        out[f"time/{phase}"] = timer.get(phase, 0.0)
    out["time/step"] = step_time
    out["throughput/tokens_per_s"] = tokens * world / step_time
    out["memory/peak_mb"] = _peak_memory_mb(device)
    return out


def _rollout_rows(ro, n: int) -> list[dict]:
    G = ro.num_rows // max(1, len(ro.samples))
    rows = []
    for i in range(min(n, ro.num_rows)):
        s = ro.samples[i // G]
        rows.append(
            {
                "question": s.question,
                "answer": s.answer,
                "question_type": s.question_type,
                "response": ro.texts[i],
                "reward": float(ro.rewards[i]),
                "advantage": float(ro.advantages[i]),
                "views": ro.view_records[i // G],
            }
        )
    return rows


def _save(run_dir, step, model, processor, optimizer, scheduler, sampler, cfg, rank) -> None:
    if rank != 0:
        return
    state = {"step": step, "sampler": sampler.state_dict(), "rng": capture_rng(), "config": cfg.to_dict()}
    save_checkpoint(run_dir, step, model, processor, optimizer, scheduler, state, keep_last=cfg.keep_last)


def _resume(ckpt: Path, model, optimizer, scheduler, sampler, logger, cfg) -> int:
    from safetensors.torch import load_file

    state = load_trainer_state(ckpt)
    weights = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        weights.update(load_file(f))
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    missing, unexpected = target.load_state_dict(weights, strict=False)
    if unexpected:
        raise ConfigError(
            f"{ckpt}: checkpoint weights do not fit the model ({len(unexpected)} unexpected keys)"
        )
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    sampler.load_state_dict(state["sampler"])
    restore_rng(state["rng"])
    logger.truncate_after(int(state["step"]))
    print(f"[cppo] resumed from {ckpt} at step {state['step']}")
    return int(state["step"])


class _progress:
    """A tqdm bar with the last reward on it; a no-op on non-main ranks."""

    def __init__(self, cfg, start: int, rank: int):
        self.bar = None
        if rank == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=start, desc=f"cppo-train {cfg.algo}", unit="step")

    def update(self, m: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                reward=f"{m.get('reward/total', 0):.3f}",
                acc=f"{m.get('reward/accuracy', 0):.2f}",
                cpl=f"{m.get('cpl/loss', 0):.3f}",
            )
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
