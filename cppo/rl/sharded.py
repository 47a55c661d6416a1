"""Sharded checkpoints of an FSDP run: every process writes its own shards, nothing is gathered.

    save_sharded_checkpoint(run_dir, step, model, processor, optimizer, scheduler, state)  # every rank
    load_shards(ckpt, model, optimizer)     # sharded or not, any number of processes (a collective)
    python -m cppo.rl.sharded CKPT OUT      # a from_pretrained copy of a sharded checkpoint

A checkpoint of an FSDP run (`checkpoints/step-NNNNNN/`, cppo.rl.checkpoint) holds

- `shards/`: the weights (float32 master weights) and the AdamW state, written by
  `torch.distributed.checkpoint` (DCP): each process writes the shards it holds (`__R_0.distcp`),
  rank 0 the index (`.metadata`). No process gathers the full model or optimizer state (with fp32
  master weights a 7B save would be ~100 GB through rank 0 while the others wait).
- `config.json`, `generation_config.json` and the processor, written by rank 0;
- `trainer_state.pt` (scheduler, sampler position, config, counters: no optimizer, it is in the
  shards), written by rank 0;
- with `export` (the run's last checkpoint, or every one under `--export-pretrained`): the gathered
  weights as `model.safetensors`, so that `from_pretrained` loads the folder as a plain model. That is
  the one full gather, to rank 0's CPU memory, of the weights only.
- `COMPLETE`, written last by rank 0, listing every file with its size and sha256, the other
  processes' shards included (cppo.rl.manifest): a resume refuses or skips a changed shard.

The folder is written as the unsharded one is: into `.tmp-step-NNNNNN/`, fsynced, renamed. The
processes agree at each stage (rank 0 made the folder; every shard is written; rank 0 finished),
so a failure on any rank raises on every rank instead of leaving the others waiting in the next
step's collective, and leaves the previous checkpoint as it was; a write that fails (a full disk,
whatever DCP, torch.save or safetensors raise) is a RunDirError, one line and exit 2. Every process
must see the run directory at the same path (one machine, or a shared filesystem).

DCP reshards on load: `load_shards` fills whatever state dict this run's model and optimizer have,
sharded over another number of processes or not sharded at all (one process, or DDP-style), so
a run resumes with another number of processes or without FSDP (tests/test_rl_fsdp.py). Keys are
the modules' parameter names, the same with and without FSDP2.
"""

from __future__ import annotations

import errno
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cppo.rl.atomic import atomic_write
from cppo.rl.checkpoint import (
    SHARDS,
    TRAINER_STATE,
    RunDirError,
    _save_model,
    checkpoint_dir,
    full_trainer_state,
    prune,
    write_error,
    write_marker,
    writes_as_oserror,
)
from cppo.rl.fsdp import full_model_state


def is_sharded_checkpoint(ckpt: Path | str) -> bool:
    """Whether `ckpt` holds DCP shards (an FSDP run's checkpoint)."""
    return (Path(ckpt) / SHARDS / ".metadata").is_file()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def share_rank0_outcome(error: BaseException | None, what: str) -> None:
    """Share rank 0's outcome of a stage: every process raises when rank 0 failed (rank 0 its own
    error; the others a RunDirError for an OSError, else a RuntimeError, naming it)."""
    if _distributed() and dist.get_world_size() > 1:
        message = None if error is None else f"{type(error).__name__}: {error}"
        outcome = [None if error is None else (isinstance(error, OSError), message)]
        dist.broadcast_object_list(outcome, src=0)
        if error is None and outcome[0] is not None:
            is_os, message = outcome[0]
            raise (RunDirError if is_os else RuntimeError)(f"rank 0 could not {what}: {message}")
    if error is not None:
        raise error


def _states(model, optimizer) -> dict:
    """This process's part of the weights and optimizer state, keyed by parameter name (DTensor
    shards under FSDP, whole tensors otherwise)."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def write_shards(directory: Path, model, optimizer) -> None:
    """Every process writes its shards of the weights and optimizer state to `directory` (a
    collective under torch.distributed)."""
    writer = dcp.FileSystemWriter(directory, sync_files=True)
    with warnings.catch_warnings():  # one process: "assuming the intent is to save in a single process"
        warnings.filterwarnings("ignore", message="torch.distributed is", category=UserWarning)
        dcp.save(_states(model, optimizer), storage_writer=writer, no_dist=not _distributed())


def _shards_failed(e: CheckpointException) -> OSError:
    """DCP's exception (every rank's failure, with tracebacks) as one OSError naming the first."""
    for rank, (exc, _) in sorted(e.failures.items()):
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO
        return OSError(code, f"rank {rank} could not write its shards: {detail}")
    return OSError(errno.EIO, "writing the shards failed")


def load_shards(ckpt: Path, model, optimizer=None) -> None:
    """Load a sharded checkpoint's weights (and, given `optimizer`, its state) into this run's
    model, sharded or not, on any number of processes (a collective under torch.distributed)."""
    state = _states(model, optimizer)
    with warnings.catch_warnings():  # one process: "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message="torch.distributed is", category=UserWarning)
        dcp.load(state, checkpoint_id=Path(ckpt) / SHARDS, no_dist=not _distributed())
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    model,
    processor,
    optimizer,
    scheduler,
    trainer_state: dict,
    keep_last: int = 2,
    keep: tuple[Path, ...] = (),
    export: bool = False,
) -> Path:
    """Write `run_dir/checkpoints/step-{step:06d}/` from every process (a collective): each its
    shards, rank 0 the rest (module docstring); prune to the last `keep_last` (0 = all) but `keep`.
    `export`: also the gathered from_pretrained weights. Returns the folder on every process (the
    loop's "saved this step?" must agree on all of them: a rank that saw None would save again,
    alone). Raises on every process when any could not write; the previous checkpoints stay."""
    rank = _rank()
    state = full_trainer_state(None, scheduler, trainer_state)  # TypeError on every rank, before writing
    full = full_model_state(model) if export else None  # a collective: on rank 0's CPU, {} elsewhere
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    error = None
    if rank == 0:
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
            (tmp / SHARDS).mkdir(parents=True)
        except OSError as e:
            error = write_error(run_dir, final, e)
    share_rank0_outcome(error, f"create {tmp}")
    try:
        write_shards(tmp / SHARDS, model, optimizer)  # raises on every rank if one fails
    except BaseException as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, CheckpointException):  # DCP's, a BaseException: a rank's write failed
            raise write_error(run_dir, final, _shards_failed(e)) from e
        raise

    def finish(folder: Path) -> None:  # rank 0, after every shard is written
        inner = getattr(model, "module", model)
        with writes_as_oserror(folder):  # a full disk in torch.save / safetensors is an OSError
            inner.config.save_pretrained(folder)
            if getattr(inner, "generation_config", None) is not None:
                inner.generation_config.save_pretrained(folder)
            if full is not None:
                _save_model(model, folder, full)
            processor.save_pretrained(folder)
            torch.save(state, folder / TRAINER_STATE)
        write_marker(folder, step)  # sizes and sha256 of every file, every process's shards too

    if rank == 0:
        try:
            atomic_write(final, finish, tmp=tmp, fresh=False)
            prune(final, keep_last, keep)
        except OSError as e:
            error = write_error(run_dir, final, e)
        except BaseException as e:
            error = e
    share_rank0_outcome(error, f"write checkpoint {final}")
    return final


def export_sharded(ckpt: Path, out: Path) -> Path:
    """Write a from_pretrained folder (model.safetensors, config, processor) at `out` from the
    sharded checkpoint `ckpt`, in this one process (no torch.distributed needed)."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from cppo.models import load_processor

    ckpt, out = Path(ckpt), Path(out)
    if not is_sharded_checkpoint(ckpt):
        raise FileNotFoundError(f"{ckpt} has no {SHARDS}/.metadata: it is not a sharded checkpoint")
    config = AutoConfig.from_pretrained(ckpt)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.float32)
    load_shards(ckpt, model)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        load_processor(ckpt).save_pretrained(folder)

    return atomic_write(out, write)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m cppo.rl.sharded CHECKPOINT OUT_DIR")
    print(export_sharded(Path(sys.argv[1]), Path(sys.argv[2])))
