"""Setting a run up: `setup_run(cfg) -> Run`, everything the loop holds, and its parts (processes and
devices, the optimizer and schedule; the policy and its reference come from cppo.rl.policy).

`setup_run` checks before any model loads everything that can be checked without one (the launch,
the run directory, the data, the resume point), so that a run that cannot go far fails at once. A
run directory holding an earlier run is refused unless --resume or --overwrite says what to do with
it (cppo.rl.rundir); --overwrite deletes the earlier run only after the model has loaded, the last
moment before the new run writes its own files.

Split from cppo/rl/loop.py so that the loop reads top to bottom on its own: `setup_run` keeps the
whole set-up order (checks, data, resume point, policy, reference, optimizer) visible in one
function, as the loop keeps the step, and each part it calls turns its library's failures into the
one-line errors cppo-train prints.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cppo.models.model_dir import ModelError
from cppo.models.versions import check_transformers
from cppo.perturb import get_preset, load_preset
from cppo.rl.atomic import RunDirError, atomic_write
from cppo.rl.checkpoint import check_writable
from cppo.rl.config import ConfigError, TrainConfig
from cppo.rl.data import PromptDataset, open_config_data, shapes_data
from cppo.rl.flags import to_yaml
from cppo.rl.fsdp import fsdp_settings
from cppo.rl.launch import check_launch, resolve_max_steps
from cppo.rl.logfiles import write_failure
from cppo.rl.perception import get_perception_term
from cppo.rl.policy import build_policy, compute_dtype
from cppo.rl.prompt_count import check_response_room, data_processor
from cppo.rl.reference import place_reference
from cppo.rl.reporting import Counters, StepLogger
from cppo.rl.resume import Checkpointer, data_fingerprint, restore, resume_point
from cppo.rl.rewards import RewardScorer
from cppo.rl.rundir import check_fresh, clear_earlier_run
from cppo.rl.sampler import PromptSampler
from cppo.rl.sharded import share_rank0_outcome
from cppo.rl.sources import find_split


@dataclass
class Run:
    """Everything a run holds, built by `setup_run`; cppo/rl/loop.py reads it top to bottom."""

    cfg: TrainConfig
    rank: int  # this process
    world: int  # processes
    device: torch.device
    sharded: bool  # the policy is sharded with FSDP2 (cppo.rl.fsdp)
    run_dir: Path
    dataset: PromptDataset
    eval_set: PromptDataset | None  # held-out data when eval_every is set
    model: Any  # the policy: float32 master weights (peft-wrapped with LoRA, FSDP-sharded)
    processor: Any
    ref: Any  # the frozen reference in the compute dtype (sharded under FSDP), or None when beta == 0
    optimizer: torch.optim.Optimizer
    scheduler: Any
    updates_per_step: int  # optimizer updates per step (> 1: old log-probs are computed)
    sampler: PromptSampler
    preset: Any  # the perturbation preset the perception term draws its views from
    scorer: RewardScorer
    logger: StepLogger
    counters: Counters
    checkpointer: Checkpointer
    start: int  # the step to continue from: 0, or the resumed checkpoint's


def setup_run(cfg: TrainConfig) -> Run:
    """Check, build and (when resuming) restore everything of a run.

    Raises ConfigError / DataError / RunDirError before any model loads when the config, the data,
    the run directory or the resume point cannot be used."""
    check_versions()  # first: a transformers below the floor would train without seeing the image
    rank, world, device = process_info(cfg)
    fsdp = fsdp_settings()  # from an accelerate config (accelerate launch); None without FSDP
    check_launch(cfg, world, sharded=fsdp is not None)
    scorer = reward_scorer(cfg)  # user reward code is imported now, not after the model has loaded
    run_dir = Path(cfg.output_dir)
    if rank == 0:
        check_fresh(cfg, run_dir)  # an earlier run there needs --resume or --overwrite
        check_writable(run_dir)  # creates it; a probe write now, not at the first checkpoint hours in
    seed_everything(cfg.seed)
    # All data is validated before the model loads: a bad file fails (strict) or is counted now.
    data_path = cfg.data or shapes_data(run_dir / "shapes", seed=cfg.seed)
    processor = data_processor(cfg)  # counts prompt tokens for max_prompt_length, with the run's pixel bounds
    check_response_room(cfg, processor)
    dataset = open_config_data(cfg, data_path, "train", processor)
    from_epochs = resolve_max_steps(cfg, len(dataset))  # epochs -> max_steps, now that the data is counted
    eval_set = _eval_set(cfg, data_path, processor) if cfg.eval_every else None
    if rank == 0:
        print(f"[cppo] data {dataset.summary()}", flush=True)
        if from_epochs:
            print(f"[cppo] {cfg.epochs:g} epochs of {len(dataset)} samples = {cfg.max_steps} steps")
        if eval_set is not None:
            print(f"[cppo] eval data {eval_set.summary()}", flush=True)
        if cfg.repetition_penalty != 1.0:
            print(
                f"[cppo] repetition_penalty {cfg.repetition_penalty}: rollouts are sampled from another "
                "distribution than the policy trained (off-policy; the PPO ratio does not correct it)",
                file=sys.stderr,
                flush=True,
            )
    fingerprint = data_fingerprint(dataset)
    ckpt, state = resume_point(cfg, run_dir, fingerprint, rank)

    sharded = fsdp is not None and dist.is_initialized()
    if fsdp is not None and not sharded and rank == 0:
        print("[cppo] the FSDP config has one process to shard over: training unsharded", flush=True)
    # sharded, the policy and the reference come back sharded, their weights read by rank 0 alone
    model, _, ref = build_policy(cfg, device, resume_from=ckpt, fsdp=fsdp if sharded else None)
    if ref is not None and not sharded:  # kept in CPU memory with --ref-offload (cppo.rl.reference)
        ref = place_reference(ref, device, False, compute_dtype(cfg, device), cfg.ref_offload)
    n_local = cfg.rollouts // world
    mini_local = (cfg.mini_batch_size or cfg.rollouts) // world
    updates_per_step = cfg.ppo_epochs * math.ceil(n_local / mini_local)
    optimizer, scheduler = build_optimizer(model, cfg, cfg.max_steps * updates_per_step)
    sampler = PromptSampler(len(dataset), cfg.prompts_per_step, seed=cfg.seed)
    preset = views_preset(getattr(cfg, get_perception_term(cfg.algo).preset_option))
    if cfg.overwrite and rank == 0:  # every check has passed and the model is loaded: now, not before
        if removed := clear_earlier_run(run_dir):
            print(
                f"[cppo] --overwrite: deleted the earlier run's {', '.join(removed)} in {run_dir}",
                file=sys.stderr,
            )
    logger = StepLogger(run_dir, cfg, rank)
    counters = Counters()
    start = 0
    if state is not None:
        start = restore(ckpt, state, cfg, model, optimizer, scheduler, sampler, counters, logger)
    else:  # a fresh start never appends to an earlier run's logs (one killed before its 1st checkpoint)
        logger.set_aside_earlier_logs()
    failed = None
    if rank == 0:  # the resolved config of the run as it goes on (a resume may change safe fields)
        try:
            write_config(run_dir, cfg)
        except RunDirError as e:
            failed = e
    # every process stops together when rank 0 could not write it, not only rank 0 (a hang)
    share_rank0_outcome(failed, f"write {run_dir / 'config.yaml'}")
    checkpointer = Checkpointer(
        cfg, run_dir, rank, sharded, model, processor, optimizer, scheduler, fingerprint, counters
    )
    logger.start(start)
    return Run(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        sharded=sharded,
        run_dir=run_dir,
        dataset=dataset,
        eval_set=eval_set,
        model=model,
        processor=processor,
        ref=ref,
        optimizer=optimizer,
        scheduler=scheduler,
        updates_per_step=updates_per_step,
        sampler=sampler,
        preset=preset,
        scorer=scorer,
        logger=logger,
        counters=counters,
        checkpointer=checkpointer,
        start=start,
    )


def check_versions() -> None:
    """ConfigError (one line) when the installed transformers is below cppo's floor."""
    try:
        check_transformers()
    except ModelError as e:
        raise ConfigError(str(e)) from None


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    """config.yaml, replaced whole (cppo.rl.atomic); a write that fails (a full disk) is a RunDirError
    line, the earlier config.yaml kept, before the first step is trained."""
    path = run_dir / "config.yaml"
    try:
        atomic_write(path, to_yaml(cfg))
    except OSError as e:
        raise RunDirError(
            f"could not write {path} ({write_failure(e)}); nothing was trained. Free space or fix "
            "permissions, then run again with --resume auto"
        ) from None


def _eval_set(cfg: TrainConfig, data_path, processor) -> PromptDataset:
    path = cfg.eval_data or find_split(data_path, "val")
    if path is None:
        raise ConfigError(
            f"eval_every is {cfg.eval_every} but no eval_data was given and {data_path} has no val split"
        )
    split = "val" if cfg.eval_data is None else "train"  # eval_data@SPLIT names another
    return open_config_data(cfg, path, split, processor, eval_data=True)


def reward_scorer(cfg: TrainConfig) -> RewardScorer:
    """The run's rewards, user functions imported; ConfigError (one line) for a missing file,
    module or function, or code that fails to import (a syntax error, an exception at import)."""
    try:
        return RewardScorer(cfg.rewards, cfg.reward_weights, timeout_s=cfg.reward_timeout)
    except ValueError as e:
        raise ConfigError(f"rewards: {e}") from None
    except Exception as e:  # the user's module raised while importing
        detail = f"{type(e).__name__}: {e}".splitlines()[0]
        raise ConfigError(f"rewards: importing a user reward failed ({detail})") from None


def process_info(cfg: TrainConfig):
    """(rank, world size, device) from accelerate's process state (starts gloo/NCCL under torchrun).

    accelerate treats a CPU machine as one process unless told `cpu=True`, even under torchrun. The
    process group it starts waits `--dist-timeout` seconds in a collective (accelerate hands `timeout`
    to `init_process_group`); a group started before this call keeps its own timeout."""
    from datetime import timedelta

    from accelerate import PartialState

    cpu = cfg.device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=cfg.dist_timeout))
    device = torch.device("cpu") if state.device.type == "cpu" else state.device
    return state.process_index, state.num_processes, device


def views_preset(name: str):
    return load_preset(name) if str(name).endswith((".yaml", ".yml")) else get_preset(name)


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
