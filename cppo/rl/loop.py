"""The GRPO / CPPO / PAPO training loop, top to bottom.

    cppo-train                                  # CPPO, bundled demo model, shapes task, CPU
    cppo-train --algo grpo --max-steps 100      # the same loop without the views and the CPL term
    torchrun --nproc_per_node 2 -m cli.train    # one process per device (gloo on CPU, NCCL on GPU)

One step: B prompts -> G rollouts each (current policy, temperature) -> rewards (0.9 accuracy +
0.1 format) -> group advantages -> [old/ref log-probs when needed] -> optimizer updates over
mini-batches of micro-batches, each with PPO-clip + beta·KL(ref) + the perception term
(cppo/rl/update.py) -> log the step, checkpoint it when due. The host's work of the next step (its
images, views and processor outputs) is prepared in a background thread while this one runs
(cppo/rl/prefetch.py, `--no-prefetch` to do it in turn). `--algo` names the perception term
(cppo/rl/perception.py): none for GRPO, lambda·CPL for CPPO, PAPO's masked-view KL; the rollouts
draw the views it needs, so GRPO, CPPO and PAPO are the same loop. Everything the loop holds (the
processes, the policy, the reference, the optimizer, the sampler, the logger, the checkpointer) is
built, checked and restored on resume by `setup_run` (cppo/rl/run.py).

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
- reward functions that raise or return NaN score 0 and go to reward_errors.jsonl with the sample;
  one that times out skips its other calls of the step (cppo.rl.rewards), and one that hangs
  `reward_hang_steps` steps in a row stops the run (RewardHungError, after the step is logged and
  before it is checkpointed) or, with `drop_hung_rewards`, is dropped: it scores 0 from then on;
- with several processes the logged metrics are the whole step's (every rank's rows, the evaluation
  split across ranks and gathered), and every decision that leads into a collective (keep_best's
  save, the skip of a bad step's save, the early stop) is read from rank 0's copy of them; a log or
  checkpoint write that fails on rank 0 raises on every rank (cppo/rl/ranks.py).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from contextlib import closing
from functools import partial
from pathlib import Path

import numpy as np

from cppo.detect.views_eval import evaluate_views, view_metrics
from cppo.models.evaluate import evaluate
from cppo.precision import autocast
from cppo.prompt import instruction_for
from cppo.rl.checkpoint import write_best
from cppo.rl.config import TrainConfig
from cppo.rl.fsdp import gathered
from cppo.rl.policy import compute_dtype
from cppo.rl.prefetch import Prefetcher
from cppo.rl.ranks import CollectiveTimeoutError, Whereabouts, collective_timeout_line, rank0_stage, rank0s
from cppo.rl.reference import reference_on
from cppo.rl.reporting import bad_steps_message, reset_peak_memory, step_metrics
from cppo.rl.rewards import HangWatch, RewardHungError, hung_reward_message
from cppo.rl.rollout import Prompts, collect_rollouts, prepare_prompts
from cppo.rl.run import seed_everything, setup_run
from cppo.rl.signals import AbortStep, StopSignals
from cppo.rl.threads import CpuThreads
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
    BadStepsError after max_bad_steps bad steps in a row, each after the run's files are consistent;
    RewardHungError (module docstring); CollectiveTimeoutError naming this process's rank, step and
    phase when a collective outlived --dist-timeout."""
    env = os.environ
    where = Whereabouts(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)))
    try:
        return _run_steps(cfg, where)
    except RuntimeError as e:  # gloo's timeout, NCCL's DistBackendError
        line = collective_timeout_line(e, cfg.dist_timeout, where)
        if line is None:
            raise
        raise CollectiveTimeoutError(line) from e


def _run_steps(cfg: TrainConfig, where: Whereabouts):
    run = setup_run(cfg)  # checks, data, policy, reference, optimizer, sampler, logger; resumes
    model, rank, world, device = run.model, run.rank, run.world, run.device
    where.rank, where.world = rank, world
    counters, checkpoints, sampler = run.counters, run.checkpointer, run.sampler
    B = cfg.prompts_per_step

    def mine(draws):  # this process's share of the step's prompts
        return draws[rank * B // world :][: B // world]

    # the host's work (images, views, processor) for the next step runs while this one runs
    prefetch = Prefetcher(partial(_prepare, run, copy.deepcopy(run.processor)), enabled=cfg.prefetch)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    cpu_threads = CpuThreads(local) if device.type == "cpu" else None
    hangs = HangWatch(run.scorer.names, cfg.reward_hang_steps)  # not saved: a resume starts the count anew
    with run.logger, closing(prefetch), StopSignals() as stops:  # a log write failure: RunDirError
        at_start = cfg.data is None if cfg.eval_at_start == "auto" else cfg.eval_at_start  # auto: the demo
        if run.eval_set is not None and at_start and run.start == 0:  # before training: step 0
            where.at("the evaluation", 0)
            metrics = rank0s(_held_out(run, Timer()), world)
            with rank0_stage("write the step's logs", world):
                run.logger.evaluation(0, metrics)
        for step in range(run.start, cfg.max_steps):
            where.at("the rollout", step + 1)
            seed_everything(_rollout_seed(cfg.seed, step, rank))
            sampler_at_start = sampler.state_dict()
            timer = Timer()
            reset_peak_memory(device)  # memory/peak_mb is this step's
            if cpu_threads is not None:
                cpu_threads.choose()  # the cores other processes leave free (cppo/rl/threads.py)
            t0 = time.perf_counter()
            try:
                with stops.abortable(world == 1):  # nothing below changes weights or optimizer
                    draws = mine(sampler.next_batch())
                    group_seeds = [d.view_seed + step for d in draws] if cfg.seed_per_prompt else None
                    with timer("rollout"):
                        prompts = prefetch.get(draws)
                        if step + 1 < cfg.max_steps:
                            prefetch.submit(mine(sampler.peek()))
                        ro = collect_rollouts(
                            model,
                            run.processor,
                            prompts,
                            cfg,
                            run.scorer,
                            generator_seed=_rollout_seed(cfg.seed, step, rank),
                            timer=timer,
                            per_prompt_seeds=group_seeds,
                        )
                    where.at("the old and reference log-probs")
                    with timer("old_ref_logprobs"):
                        if run.updates_per_step > 1:
                            ro.old_logp = rollout_logprobs(model, ro, cfg)
                        if run.ref is not None:  # on the device for its pass (--ref-offload)
                            with reference_on(run.ref, device):
                                ro.ref_logp = rollout_logprobs(run.ref, ro, cfg)
            except AbortStep:  # the state is the end of step `step`: save that, unless it is saved
                raise stops.interrupted(step, checkpoints.save_unless_saved(step, sampler_at_start)) from None
            # every metric is the whole step's, over all ranks' rows (cppo.rl.ranks), on every rank
            where.at("the policy update")
            metrics = policy_update(model, run.optimizer, run.scheduler, ro, cfg, timer, world_size=world)
            metrics.update(step_metrics(ro, timer, time.perf_counter() - t0, device, world))
            last = step + 1 == cfg.max_steps
            if run.eval_set is not None and ((step + 1) % cfg.eval_every == 0 or last):
                where.at("the evaluation")
                metrics.update(_held_out(run, timer))
            metrics = rank0s(metrics, world)  # every decision below is taken once, from rank 0's metrics
            bad = counters.count(metrics)
            where.at("writing the step's logs")
            with rank0_stage("write the step's logs", world):
                run.logger.step(step + 1, metrics, ro, bad)
            if cfg.max_bad_steps and counters.bad_streak >= cfg.max_bad_steps:
                raise BadStepsError(bad_steps_message(step + 1, counters, metrics, run.run_dir, cfg))
            for name in hangs.update(metrics):  # the same on every rank: read from rank 0's metrics
                line = hung_reward_message(run.scorer, name, cfg.reward_hang_steps)
                if not cfg.drop_hung_rewards:
                    raise RewardHungError(line)
                run.scorer.drop(name)
                if rank == 0:
                    print(f"[cppo] step {step + 1}: dropped {line.split(';')[0]}; it scores 0 from now on",
                          file=sys.stderr)  # fmt: skip
            saved = None
            where.at("saving the checkpoint")
            with rank0_stage("save the checkpoint", world):  # rank 0 alone writes unless sharded
                if cfg.keep_best and not bad and metrics.get("eval/accuracy", -1.0) > counters.best_score:
                    counters.best_step, counters.best_score = step + 1, metrics["eval/accuracy"]
                    saved = checkpoints.save(step + 1, sampler.state_dict())
                    if rank == 0:
                        write_best(run.run_dir, step + 1, counters.best_score, "eval/accuracy")
                due = last or (cfg.save_every and (step + 1) % cfg.save_every == 0 and not bad)
                if saved is None and due:
                    saved = checkpoints.save(step + 1, sampler.state_dict())
            if not last and stops.requested(world, device):
                raise stops.interrupted(step + 1, saved or checkpoints.save(step + 1, sampler.state_dict()))
    run.logger.finish()  # rank 0: curves.png, the trackers' image and close, summary.json and its lines
    return run.run_dir, model


def _prepare(run, processor, draws) -> Prompts:
    """The host's part of a step's rollouts (cppo.rl.rollout.prepare_prompts): the draws' samples
    loaded, their prompts and views encoded, with `processor` (the background thread's own copy)."""
    samples = [run.dataset[d.index] for d in draws]
    seeds = [d.view_seed for d in draws]
    return prepare_prompts(
        processor, samples, seeds, run.cfg.algo, run.preset, instruction_for(run.cfg.instruction)
    )


def _held_out(run, timer: Timer) -> dict[str, float]:
    """The evaluation's eval/* metrics and time/eval (rank 0's: the gather at its end syncs the ranks)."""
    with timer("eval"), gathered(run.model), autocast(run.device, compute_dtype(run.cfg, run.device)):
        metrics = _evaluate(run.model, run.processor, run.eval_set, run.cfg, run.rank, run.world, run.scorer)
    return {**metrics, "time/eval": timer["eval"]}


def _evaluate(
    model, processor, dataset, cfg: TrainConfig, rank: int, world: int, scorer=None
) -> dict[str, float]:
    """The held-out evaluation's eval/* metrics, on the first `eval_limit` items (all with none).

    eval/accuracy, eval/format: avg@K by the evaluator's grader (cppo.grading's default).
    eval/reward/total: the official validation score, the answers scored by the run's own reward
    functions and weights (`scorer`; vbdi/cppo verl/verl/trainer/ppo/ray_trainer.py `_validate` scores
    them with the training reward; the paper configs: 0.9 x mathruler accuracy + 0.1 x format, greedy,
    all of Geometry3K's test split); eval/reward/<name> each function's mean, as the rollouts'
    reward/* keys. With --eval-views, the view metrics of the same items (eval/views/*: robustness,
    consistency, removing, blank, entropy_shift; one draw of each kind, seeded by cfg.seed, so every
    evaluation sees the same views). Each process answers its share of the batches and the graded
    questions are gathered (`cppo.models.evaluate.evaluate`, rank/world): every rank gets the report
    one process would, and scores all of it."""
    answering = dict(
        samples=cfg.eval_samples,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        limit=cfg.eval_limit,
        temperature=None if cfg.eval_samples == 1 else cfg.temperature,
        instruction=instruction_for(cfg.instruction),
        rank=rank,
        world=world,
    )
    report = evaluate(model, processor, dataset, token_ids=cfg.eval_views is not None, **answering)
    metrics = {"eval/accuracy": report["accuracy"], "eval/format": report["format"]}
    if scorer is not None:
        metrics.update(_eval_rewards(report["questions"], dataset, scorer))
    if cfg.eval_views is not None:  # the same items under the preset's views (cppo.detect.views_eval)
        views = evaluate_views(model, processor, dataset, cfg.eval_views, draws=1, clean=report, **answering)
        metrics.update(view_metrics(views))
    return metrics


def _eval_rewards(questions: list[dict], dataset, scorer) -> dict[str, float]:
    """eval/reward/*: the held-out answers (the dataset's first len(questions) items, in order, K
    answers each) scored by the run's reward functions."""
    items = [dataset[i].to_dict() for i in range(len(questions))]
    samples = [item for item, q in zip(items, questions) for _ in q["responses"]]
    scored = scorer([r for q in questions for r in q["responses"]], [s["answer"] for s in samples], samples)
    rewards = {f"eval/reward/{name}": _mean(values) for name, values in scored.components.items()}
    errors = float(len(scored.errors))
    return {"eval/reward/total": _mean(scored.total), **rewards, "eval/reward/errors": errors}


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def _rollout_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
