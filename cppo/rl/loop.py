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
- the I+/I- passes run only on rows that can carry CPL (docs/method.md §5.7), and the output head only on
  response positions, in chunks (§5.8);
- processes share gradients by an explicit all-reduce of their sum after each mini-batch rather
  than a DDP wrapper, because a CPPO micro-batch makes up to three forward passes of the same
  module before one backward, which DDP's hooks do not expect.

Faults (docs/reliability.md has the table of what was tried):
- every process reseeds Python, numpy and torch from (seed, step, rank) at the start of each step,
  so a resumed run draws what the uninterrupted one drew on every rank without saving any RNG state;
- SIGTERM / SIGINT: during the rollout of a single-process run the step is abandoned (nothing has
  touched the weights yet); otherwise the step finishes. Either way the last completed step is
  checkpointed and the run raises RunInterrupted (cppo-train exits 128 + signal: 143 / 130). A
  second signal stops at once, leaving the previous checkpoint;
- a step with a skipped (non-finite) optimizer update is logged with its non-finite metrics and
  counted (update/bad_steps_total, update/bad_streak); it is not checkpointed (except at the run's
  end or on a signal), and max_bad_steps in a row stop the run (BadStepsError) with the last good
  checkpoint in place;
- reward functions that raise or return NaN score 0 and go to reward_errors.jsonl with the sample.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist

from cppo.precision import autocast
from cppo.rl.atomic import atomic_write
from cppo.rl.checkpoint import (
    check_writable,
    checkpoint_dir,
    checkpoint_step,
    latest_checkpoint,
    save_checkpoint,
    write_best,
)
from cppo.rl.config import ConfigError, TrainConfig, check_launch
from cppo.rl.data import PromptSampler, find_split, open_dataset, shapes_data
from cppo.rl.evaluate import evaluate
from cppo.rl.fsdp import (
    fsdp_settings,
    full_model_state,
    full_optimizer_state,
    gathered,
    is_sharded,
    load_full_optimizer_state,
    shard_policy,
)
from cppo.rl.resume import data_fingerprint, gpu_count, resume_point
from cppo.rl.rewards import RewardScorer
from cppo.rl.rollout import collect_rollouts
from cppo.rl.runlog import RunLogger, plot_curves
from cppo.rl.setup import (
    build_optimizer,
    build_policy,
    compute_dtype,
    enable_gradient_checkpointing,
    process_info,
    seed_everything,
    views_preset,
)
from cppo.rl.signals import AbortStep, StopSignals
from cppo.rl.steplog import (
    Progress,
    bad_steps_message,
    count_bad_step,
    report_step,
    reset_peak_memory,
    reward_error_rows,
    rollout_rows,
    step_metrics,
)
from cppo.rl.update import Timer, policy_update, rollout_logprobs


class BadStepsError(RuntimeError):
    """max_bad_steps consecutive steps had a non-finite loss or gradient norm."""


def train(cfg: TrainConfig) -> Path:
    """Run the configured training; returns the run directory."""
    return run_training(cfg)[0]


def run_training(cfg: TrainConfig):
    """Run the configured training; returns (run directory, trained policy).

    Raises ConfigError / DataError / RunDirError before any model loads when the config, the data,
    the run directory or the resume point cannot be used; RunInterrupted on SIGTERM/SIGINT and
    BadStepsError after max_bad_steps bad steps in a row, each after the run's files are consistent."""
    rank, world, device = process_info(cfg)
    fsdp = fsdp_settings()  # from an accelerate config (accelerate launch); None without FSDP
    check_launch(cfg, world, sharded=fsdp is not None)
    run_dir = Path(cfg.output_dir)
    if rank == 0:
        check_writable(run_dir)  # creates it; a probe write now, not at the first checkpoint hours in
    seed_everything(cfg.seed)
    # All data is validated before the model loads: a bad file fails (strict) or is counted now.
    data_path = cfg.data or shapes_data(run_dir / "shapes", seed=cfg.seed)
    dataset = open_dataset(data_path, strict=cfg.data_strict)
    eval_set = _eval_set(cfg, data_path) if cfg.eval_every else None
    if rank == 0:
        print(f"[cppo] data {dataset.summary()}", flush=True)
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

    model, processor, ref = build_policy(cfg, device, resume_from=ckpt)
    sharded = fsdp is not None and dist.is_initialized()
    if fsdp is not None and not sharded and rank == 0:
        print("[cppo] the FSDP config has one process to shard over: training unsharded", flush=True)
    if sharded:
        if fsdp.activation_checkpointing and not cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model = shard_policy(model, fsdp, device, compute_dtype(cfg, device))
    n_local = cfg.rollouts // world
    mini_local = (cfg.mini_batch_size or cfg.rollouts) // world
    updates_per_step = cfg.ppo_epochs * math.ceil(n_local / mini_local)
    optimizer, scheduler = build_optimizer(model, cfg, cfg.max_steps * updates_per_step)
    sampler = PromptSampler(len(dataset), cfg.prompts_per_step, seed=cfg.seed)
    preset = views_preset(cfg.preset if cfg.algo != "papo" else cfg.papo_preset)
    scorer = RewardScorer(cfg.rewards, cfg.reward_weights)
    logger = RunLogger(run_dir, tensorboard=cfg.tensorboard, is_main=rank == 0)
    guard = {"bad_steps_total": 0, "bad_streak": 0, "best_step": 0, "best_score": -1.0}
    start = 0
    if state is not None:
        start = _resume(ckpt, state, model, optimizer, scheduler, sampler, guard, logger, cfg)
    if rank == 0:  # the resolved config of the run as it goes on (a resume may change safe fields)
        atomic_write(run_dir / "config.yaml", cfg.to_yaml())

    def save(step: int, sampler_state: dict) -> Path | None:
        full = {}
        if sharded:  # a collective: every process gathers, rank 0 writes
            full = {
                "model_state": full_model_state(model),
                "optimizer_state": full_optimizer_state(model, optimizer),
            }
        if rank != 0:
            return None
        trainer = {
            "step": step,
            "sampler": sampler_state,
            "gpus": gpu_count(),  # a resume must see as many (cppo.rl.resume.check_gpu_count)
            "config": cfg.to_dict(),
            "data_fingerprint": fingerprint,
            "guard": dict(guard),
        }
        keep = (checkpoint_dir(run_dir, guard["best_step"]),) if guard["best_step"] else ()
        return save_checkpoint(
            run_dir, step, model, processor, optimizer, scheduler, trainer, cfg.keep_last, keep=keep, **full
        )

    progress = Progress(cfg, start, rank)
    stops = StopSignals()
    try:
        with stops:
            for step in range(start, cfg.max_steps):
                seed_everything(_rollout_seed(cfg.seed, step, rank))
                sampler_at_start = sampler.state_dict()
                timer = Timer()
                reset_peak_memory(device)  # memory/peak_mb is this step's
                t0 = time.perf_counter()
                try:
                    with stops.abortable(world == 1):  # nothing below changes weights or optimizer
                        draws = sampler.next_batch()[rank * cfg.prompts_per_step // world :]
                        draws = draws[: cfg.prompts_per_step // world]
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
                                per_prompt_seeds=[d.view_seed + step for d in draws]
                                if cfg.seed_per_prompt
                                else None,
                            )
                        with timer("old_ref_logprobs"):
                            if updates_per_step > 1:
                                ro.old_logp = rollout_logprobs(model, ro, cfg)
                            if ref is not None:
                                ro.ref_logp = rollout_logprobs(ref, ro, cfg)
                except AbortStep:  # the state is the end of step `step`: save that, unless it is saved
                    latest = latest_checkpoint(run_dir)
                    saved = latest if latest is not None and checkpoint_step(latest) == step else None
                    if saved is None and step > 0:
                        saved = save(step, sampler_at_start)
                    raise stops.interrupted(step, saved) from None
                metrics = policy_update(model, optimizer, scheduler, ro, cfg, timer, world_size=world)
                metrics.update(step_metrics(ro, timer, time.perf_counter() - t0, device, world))
                if eval_set is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
                    with timer("eval"), gathered(model), autocast(device, compute_dtype(cfg, device)):
                        metrics.update(_evaluate(model, processor, eval_set, cfg))
                    metrics["time/eval"] = timer["eval"]
                bad = count_bad_step(guard, metrics)
                logger.log(step + 1, metrics)
                logger.log_rollouts(step + 1, rollout_rows(ro, cfg.log_rollouts))
                logger.log_reward_errors(step + 1, reward_error_rows(ro, rank))
                progress.update(metrics)
                if rank == 0:
                    report_step(step + 1, metrics, ro, bad)
                if cfg.max_bad_steps and guard["bad_streak"] >= cfg.max_bad_steps:
                    raise BadStepsError(bad_steps_message(step + 1, guard, metrics, run_dir, cfg))
                last = step + 1 == cfg.max_steps
                saved = None
                if cfg.keep_best and not bad and metrics.get("eval/accuracy", -1.0) > guard["best_score"]:
                    guard["best_step"], guard["best_score"] = step + 1, metrics["eval/accuracy"]
                    saved = save(step + 1, sampler.state_dict())
                    if rank == 0:
                        write_best(run_dir, step + 1, guard["best_score"], "eval/accuracy")
                due = last or (cfg.save_every and (step + 1) % cfg.save_every == 0 and not bad)
                if saved is None and due:
                    saved = save(step + 1, sampler.state_dict())
                if not last and stops.requested(world, device):
                    raise stops.interrupted(step + 1, saved or save(step + 1, sampler.state_dict()))
    finally:
        progress.close()
        logger.close()
    if rank == 0 and (run_dir / "metrics.jsonl").is_file():
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    return run_dir, model


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


def _resume(ckpt: Path, state: dict, model, optimizer, scheduler, sampler, guard, logger, cfg) -> int:
    """Load the optimizer, schedule, data position and counters of `ckpt` (the weights are loaded by
    build_policy); drop log lines written after it. Returns the step to continue from.

    An optimizer state keyed by parameter name is a full one saved from an FSDP run: it loads into
    a sharded or an unsharded model alike."""
    if is_sharded(model) or _keyed_by_name(state["optimizer"]):
        load_full_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    try:
        sampler.load_state_dict(state["sampler"])
    except ValueError:
        if not cfg.force_resume:
            raise
        print("[cppo] the data order cannot continue (forced resume): starting a new epoch", file=sys.stderr)
        sampler.epoch, sampler.offset = int(state["sampler"]["epoch"]) + 1, 0
    guard.update(state.get("guard", {}))
    step = int(state["step"])
    logger.truncate_after(step)
    saved_max = state.get("config", {}).get("max_steps", cfg.max_steps)
    if saved_max != cfg.max_steps and cfg.lr_schedule != "constant":
        print(
            f"[cppo] max_steps {saved_max} -> {cfg.max_steps} stretches the {cfg.lr_schedule} "
            "schedule from here",
            file=sys.stderr,
        )
    print(f"[cppo] resumed from {ckpt} at step {step}", flush=True)
    return step


def _keyed_by_name(optimizer_state: dict) -> bool:
    return any(isinstance(k, str) for k in optimizer_state.get("state", {}))
