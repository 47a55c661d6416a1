"""Saving a run's trainer state and resuming from it: `Checkpointer`, `resume_point`, `restore`.

`Checkpointer(...).save(step, sampler_state)` writes a checkpoint (cppo.rl.checkpoint) with the
trainer state a resume reads back: step, sampler position, config, data fingerprint, GPU count and
the run's counters. Under FSDP it is a collective: every process writes its shards of the weights
and optimizer state (cppo.rl.sharded), rank 0 the rest; the run's last checkpoint (every one with
`export_pretrained`) also gets the gathered from_pretrained weights.

`resume_point(cfg, run_dir, data_fingerprint(dataset), rank)` picks the checkpoint (`--resume
auto`: the latest complete one whose files match the sha256 its manifest recorded, each process
hashing a share of the files; a corrupted one is moved aside to `step-NNNNNN.corrupt` with a warning
and the one before is used) and refuses,
with one line listing why,

- a checkpoint that is incomplete, corrupted (given by path) or unreadable with `weights_only`;
- a config that changed a field not marked `resume_safe` in `TrainConfig` (run length, logging,
  saving, evaluation, compute layout may change: `cppo.rl.config.resume_safe_fields`);
- data whose samples changed;
- abandoning newer checkpoints of the same run,

unless `force_resume` (which then deletes those newer checkpoints, so that a later `--resume auto`
cannot pick the abandoned branch). A checkpoint written by a process that saw another number of
GPUs than this one is refused even when forced (`gpu_count`, stored in the trainer state).
`restore` then loads the optimizer, schedule, sampler position and counters (the weights are loaded
with the policy, cppo.rl.policy.build_policy; a sharded checkpoint's weights and optimizer state from
its shards, resharded to this run's processes, with or without FSDP).

The data fingerprint a checkpoint records is `data_fingerprint`'s: the `datasets` dataset's own
`_fingerprint` with the rows kept where the data is one, else a hash of the samples.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cppo.rl.checkpoint import (
    checkpoint_corruption,
    checkpoint_dir,
    checkpoint_problem,
    checkpoint_step,
    complete_checkpoints,
    incomplete_checkpoints,
    latest_checkpoint,
    load_trainer_state,
    newer_checkpoints,
    save_checkpoint,
    set_aside,
)
from cppo.rl.config import ConfigError, TrainConfig, resume_safe_fields
from cppo.rl.fsdp import is_sharded, load_full_optimizer_state
from cppo.rl.reporting import Counters, StepLogger
from cppo.rl.sampler import PromptSampler
from cppo.rl.sharded import is_sharded_checkpoint, load_shards, save_sharded_checkpoint


def data_fingerprint(dataset) -> str:
    """The samples' fingerprint: for a ``datasets`` source the dataset's ``_fingerprint`` with the
    rows kept (``PromptDataset.fingerprint``, cppo.rl.data); for a JSONL file, a hash of the
    samples' questions, answers, types and image references, in order."""
    if getattr(dataset, "fingerprint", None):
        return dataset.fingerprint
    h = hashlib.sha256()
    for r in dataset.records:
        images = [i if isinstance(i, str) else type(i).__name__ for i in r.images]
        h.update(json.dumps([r.question, r.answer, r.question_type, images], default=str).encode())
    return h.hexdigest()[:16]


def gpu_count() -> int:
    """The GPUs this process sees once it uses CUDA (0 before, or without CUDA): the trainer state
    records it, and a resume must see as many."""
    return torch.cuda.device_count() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0


def _saved_gpu_count(state: dict) -> int:
    if "gpus" in state:
        return int(state["gpus"])
    return len(state.get("rng", {}).get("cuda", ()))  # a checkpoint that stored its CUDA RNG states


def check_gpu_count(ckpt: Path, state: dict) -> None:
    """Refuse (ConfigError) a checkpoint saved by a process that saw another number of GPUs than
    this one sees (only when both used CUDA)."""
    saved = _saved_gpu_count(state)
    if saved and torch.cuda.is_available() and saved != torch.cuda.device_count():
        raise ConfigError(
            f"cannot resume from {ckpt}: it was written by a process that saw {saved} GPUs, this one "
            f"sees {torch.cuda.device_count()}: resume with the same CUDA_VISIBLE_DEVICES"
        )


def config_changes(saved: dict, current: dict, safe: frozenset[str] | None = None) -> list[str]:
    """`["group_size 2 -> 3", ...]`: fields in both configs, outside `safe` (default: the fields
    marked resume_safe), whose values differ. A field only one side has (a config from another
    version) is not compared."""
    safe = resume_safe_fields() if safe is None else safe
    changes = []
    for key in saved:
        if key in current and key not in safe and _norm(saved[key]) != _norm(current[key]):
            changes.append(f"{key} {saved[key]!r} -> {current[key]!r}")
    return changes


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def resume_point(cfg, run_dir: Path, fingerprint: str, rank: int = 0):
    """(checkpoint, its trainer state) to resume from, or (None, None); refuses (ConfigError) an
    incomplete or corrupted checkpoint, a changed config or data, and abandoning newer checkpoints,
    unless forced.

    Every process hashes its share of the checkpoint's files (`_verified_checkpoint`); rank 0 alone
    lists, warns, moves aside and deletes, and checks the trainer state; the other processes take
    its choice (or its refusal), so that all resume from the same checkpoint and none reads a folder
    rank 0 is moving, and then read that checkpoint's trainer state themselves."""
    if not cfg.resume:
        return None, None
    ckpt = _verified_checkpoint(cfg, run_dir, rank)
    if ckpt is None:
        return None, None
    picked: dict = {}

    def check() -> None:
        picked["state"] = _checked_state(cfg, run_dir, ckpt, fingerprint)

    _decided_on_rank0(rank, check)
    state = picked["state"] if rank == 0 else _read_state(ckpt)
    check_gpu_count(ckpt, state)
    return ckpt, state


def _world_size() -> int:
    """The processes of a distributed run (1 without a process group)."""
    initialized = dist.is_available() and dist.is_initialized()
    return dist.get_world_size() if initialized else 1


def _decided_on_rank0(rank: int, decide):
    """`decide()` run on rank 0 only; its result, or its failure as a ConfigError (or RuntimeError),
    given to every process of a distributed run."""
    result, error = None, None
    if rank == 0:
        try:
            result = decide()
        except Exception as e:
            error = e
    if _world_size() > 1:
        failed = None if error is None else (isinstance(error, ConfigError), str(error))
        box = [(result, failed)]
        dist.broadcast_object_list(box, src=0)
        result, failed = box[0]
        if rank != 0 and failed is not None:
            raise (ConfigError if failed[0] else RuntimeError)(failed[1])
    if error is not None:
        raise error
    return result


def _verified_checkpoint(cfg, run_dir: Path, rank: int) -> Path | None:
    """The checkpoint `--resume` names, or for `auto` the latest complete one whose files match their
    sha256: a corrupted one is set aside (`step-NNNNNN.corrupt`) with a warning and the one before
    is tried. An explicit checkpoint that is incomplete or corrupted is refused (ConfigError).

    Rank 0 lists the candidates; every process hashes its share of a candidate's files (a 7B
    checkpoint is ~85 GB: each of W processes reads about 1/W of it, a file being one process's)
    and the verdicts are gathered, so every process reaches the same decision; rank 0 alone warns and
    moves. Without a process group, this one process hashes every file."""
    candidates = _decided_on_rank0(rank, lambda: [str(p) for p in _candidates(cfg, run_dir)])
    for ckpt in map(Path, candidates):
        problem = _corruption_on_every_rank(ckpt, rank)
        if problem is None:
            return ckpt
        if cfg.resume != "auto":
            raise _refusal(ckpt, problem)
        _decided_on_rank0(rank, partial(_set_aside_corrupted, ckpt, problem))
    if rank == 0:
        print(f"[cppo] resume auto: no complete checkpoint in {run_dir}; starting at step 0")
    return None


def _candidates(cfg, run_dir: Path) -> list[Path]:
    """The checkpoints to try, in order: the one `--resume` names (refused with ConfigError when
    incomplete), or for `auto` every complete one, newest first (the incomplete ones named on stderr)."""
    if cfg.resume != "auto":
        ckpt = Path(cfg.resume)
        if problem := checkpoint_problem(ckpt):
            raise _refusal(ckpt, problem)
        return [ckpt]
    for path, problem in incomplete_checkpoints(run_dir):
        print(f"[cppo] ignoring incomplete checkpoint {path}: {problem}", file=sys.stderr)
    return list(reversed(complete_checkpoints(run_dir)))


def _refusal(ckpt: Path, problem: str) -> ConfigError:
    return ConfigError(f"cannot resume from {ckpt}: {problem}; give another checkpoint or --resume auto")


def _corruption_on_every_rank(ckpt: Path, rank: int) -> str | None:
    """`checkpoint_corruption` of `ckpt`, each process hashing its share: the first problem any
    process found (in rank order), the same on every process; None when every share is intact."""
    world = _world_size()
    problem = checkpoint_corruption(ckpt, rank, world)
    if world == 1:
        return problem
    verdicts: list[str | None] = [None] * world
    dist.all_gather_object(verdicts, problem)
    return next((p for p in verdicts if p is not None), None)


def _set_aside_corrupted(ckpt: Path, problem: str) -> None:
    moved = set_aside(ckpt, "corrupt")
    print(
        f"[cppo] skipping corrupted checkpoint {ckpt}: {problem}; moved to {moved.name}, "
        "trying the one before",
        file=sys.stderr,
    )


def _read_state(ckpt: Path) -> dict:
    try:
        return load_trainer_state(ckpt)  # weights_only: never runs code from the checkpoint
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot read {ckpt / 'trainer_state.pt'} with torch.load(weights_only=True) ({first}); "
            "nothing in it was executed. It was not written by cppo-train or was altered: resume from "
            "another checkpoint"
        ) from None


def _checked_state(cfg, run_dir: Path, ckpt: Path, fingerprint: str) -> dict:
    """The trainer state of `ckpt` once the config, data and newer checkpoints allow resuming from it
    (ConfigError otherwise, unless forced: then the newer checkpoints are deleted)."""
    state = _read_state(ckpt)
    check_gpu_count(ckpt, state)
    step = int(state["step"])
    changes = config_changes(state.get("config", {}), cfg.to_dict())
    if state.get("data_fingerprint", fingerprint) != fingerprint:
        changes.append("data contents (the samples differ from the checkpoint's)")
    newer = (
        newer_checkpoints(run_dir, step)
        if ckpt.resolve().parent == (run_dir / "checkpoints").resolve()
        else []
    )
    if newer:
        changes.append(
            f"abandons newer checkpoints {', '.join(p.name for p in newer)} (--force-resume deletes them)"
        )
    if changes and not cfg.force_resume:
        raise ConfigError(
            f"refusing to resume from {ckpt}: {'; '.join(changes)}. Restore these settings, use a new "
            "--output-dir, or pass --force-resume"
        )
    if changes:
        print(f"[cppo] --force-resume from {ckpt} despite: {'; '.join(changes)}", file=sys.stderr)
    for path in newer:  # so that a later --resume auto cannot pick the abandoned branch
        shutil.rmtree(path)
    return state


@dataclass
class Checkpointer:
    """Writes the run's checkpoints: `save(step, sampler_state)` (module docstring)."""

    cfg: TrainConfig
    run_dir: Path
    rank: int
    sharded: bool  # FSDP: every process writes its shards (cppo.rl.sharded)
    model: Any
    processor: Any
    optimizer: Any
    scheduler: Any
    fingerprint: str  # data_fingerprint of the training data
    counters: Counters

    def save(self, step: int, sampler_state: dict) -> Path | None:
        """Write the checkpoint of `step` (a collective under FSDP); its path on rank 0, or on every
        rank under FSDP, else None. The best checkpoint so far (--keep-best) is kept whatever
        keep_last says."""
        if self.rank != 0 and not self.sharded:
            return None
        trainer = {
            "step": step,
            "sampler": sampler_state,
            "gpus": gpu_count(),  # a resume must see as many (check_gpu_count)
            "config": self.cfg.to_dict(),
            "data_fingerprint": self.fingerprint,
            "guard": asdict(self.counters),
        }
        best = self.counters.best_step
        keep = (checkpoint_dir(self.run_dir, best),) if best else ()
        parts = (self.model, self.processor, self.optimizer, self.scheduler, trainer)
        if self.sharded:
            export = self.cfg.export_pretrained or step >= self.cfg.max_steps  # the run's last
            return save_sharded_checkpoint(
                self.run_dir, step, *parts, self.cfg.keep_last, keep=keep, export=export
            )
        return save_checkpoint(self.run_dir, step, *parts, self.cfg.keep_last, keep=keep)

    def save_unless_saved(self, step: int, sampler_state: dict) -> Path | None:
        """The checkpoint of `step`: the latest one when it is that step's, else a new one (none for
        step 0, the untrained start)."""
        latest = latest_checkpoint(self.run_dir)
        if latest is not None and checkpoint_step(latest) == step:
            return latest
        return self.save(step, sampler_state) if step > 0 else None


def restore(
    ckpt: Path,
    state: dict,
    cfg: TrainConfig,
    model,
    optimizer,
    scheduler,
    sampler: PromptSampler,
    counters: Counters,
    logger: StepLogger,
) -> int:
    """Load the optimizer, schedule, data position and counters of `ckpt` (the weights are loaded by
    build_policy); drop log lines written after it. Returns the step to continue from.

    A sharded checkpoint's weights and optimizer state load from its shards (DCP reshards them to
    this run). An optimizer state keyed by parameter name is a full one saved from an FSDP run
    before checkpoints were sharded: it loads into a sharded or an unsharded model alike."""
    if is_sharded_checkpoint(ckpt):
        load_shards(ckpt, model, optimizer)
    elif is_sharded(model) or _keyed_by_name(state["optimizer"]):
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
    counters.load(state.get("guard", {}))
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
