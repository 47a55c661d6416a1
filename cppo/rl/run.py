"""Setting a run up: `setup_run(cfg) -> Run`, everything the loop holds, and its parts (processes and
devices, the policy with LoRA, frozen parts and reference, the optimizer and schedule).

`setup_run` checks before any model loads everything that can be checked without one (the launch,
the run directory, the data, the resume point), so that a run that cannot go far fails at once. A
run directory holding an earlier run is refused unless --resume or --overwrite says what to do with
it (cppo.rl.rundir); --overwrite deletes the earlier run only after the model has loaded, the last
moment before the new run writes its own files.

Split from cppo/rl/loop.py so that the loop reads top to bottom on its own. It runs past 300
lines because `setup_run` keeps the whole set-up order (checks, data, resume point, policy,
sharding, reference, optimizer) visible in one function, as the loop keeps the step, and each part
it calls turns its library's failures into the one-line errors cppo-train prints.
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

from cppo.models import demo_model_path, load_model_and_processor, load_processor
from cppo.models.build import meta_model
from cppo.models.model_dir import ModelError
from cppo.models.versions import check_transformers
from cppo.perturb import get_preset, load_preset
from cppo.precision import resolve_dtype
from cppo.rl.atomic import RunDirError, atomic_write
from cppo.rl.checkpoint import check_writable
from cppo.rl.config import ConfigError, TrainConfig, check_launch, resolve_max_steps
from cppo.rl.data import (
    PromptDataset,
    check_response_room,
    data_processor,
    find_split,
    open_config_data,
    shapes_data,
)
from cppo.rl.fsdp import FSDPSettings, fill_from_rank0, fsdp_settings, shard_policy
from cppo.rl.logfiles import write_failure
from cppo.rl.perception import get_perception_term
from cppo.rl.reference import build_reference, place_reference
from cppo.rl.reporting import Counters, StepLogger
from cppo.rl.resume import Checkpointer, data_fingerprint, restore, resume_point
from cppo.rl.rewards import RewardScorer
from cppo.rl.rundir import check_fresh, clear_earlier_run
from cppo.rl.sampler import PromptSampler
from cppo.rl.sharded import is_sharded_checkpoint, share_rank0_outcome


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
        atomic_write(path, cfg.to_yaml())
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


def views_preset(name: str):
    return load_preset(name) if str(name).endswith((".yaml", ".yml")) else get_preset(name)


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
