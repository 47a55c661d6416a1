"""Checkpoints on disk: atomic save, listing, pruning and loading, and a write probe for the run dir.

A checkpoint is a directory `run_dir/checkpoints/step-{step:06d}/` holding

- the model (`model.save_pretrained`, safetensors) and processor: `from_pretrained` /
  `cppo.models.load_model_and_processor` load it as a plain Qwen2.5-VL. A peft (LoRA) model is
  saved with its adapters merged into the weights, and its adapter alone under `adapter/` (what a
  resume loads with `PeftModel.from_pretrained(base, ckpt / "adapter", is_trainable=True)`).
- `trainer_state.pt`: `{"optimizer": ..., "scheduler": ..., **trainer_state}` (step, sampler state,
  config dict, data fingerprint, GPU count, counters), read back by `load_trainer_state` with
  `weights_only=True` only.
- or, from an FSDP run, `shards/` (each process's shards of the weights and optimizer state, the
  model's config and the processor; the last checkpoint also the full weights: cppo.rl.sharded).
- `COMPLETE`, written last: a JSON manifest of every other file with its size and sha256
  (cppo.rl.manifest). A checkpoint counts as complete only when the marker is a valid manifest and
  every file it lists exists with its size (`checkpoint_problem`, cheap), so a folder copied by hand
  and cut short, one whose disk lost a file, or one with a damaged marker is ignored by
  `latest_checkpoint` (markers of the older `step N` form are checked for the trainer state and the
  weights only). The sha256 of every file is checked (`checkpoint_corruption`, reads every byte) only
  before a run resumes from it: cppo.rl.resume skips or refuses a checkpoint changed in place.

Everything is written into a temporary sibling `.tmp-step-...` and put in place by
`cppo.rl.atomic.atomic_write` (every file and folder fsynced, renamed, the parent fsynced): a kill at
any moment leaves the previous complete checkpoint and, at worst, a temporary folder that
`latest_checkpoint` ignores and the next save removes. Older checkpoints are pruned only after the
new one is in place.

Call `save_checkpoint` on the main process only (with DDP every rank holds the same weights and
optimizer state); under FSDP every process calls `cppo.rl.sharded.save_sharded_checkpoint`. Whether
and from where a run resumes is `cppo.rl.resume`; stopping on a signal is `cppo.rl.signals`.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from cppo.rl.atomic import RunDirError, atomic_write
from cppo.rl.manifest import MARKER as MARKER
from cppo.rl.manifest import content_problem, manifest_problem, read_manifest, write_marker

CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
SHARDS = "shards"  # an FSDP run's torch.distributed.checkpoint folder (cppo.rl.sharded)
BEST_FILE = "best.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def check_writable(run_dir: Path) -> None:
    """Create `run_dir` if needed and write, fsync and remove a probe file in it, or raise RunDirError."""
    run_dir = Path(run_dir)
    probe = run_dir / f".write-probe-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"probe\n")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise RunDirError(
            f"run directory {run_dir} is not writable ({e.strerror or e}): "
            "fix its permissions or free space, or choose another --output-dir"
        ) from e


# ----------------------------------------------------------------------------------------- saving


def _check_weights_only(obj, what: str) -> None:
    """Fail before writing anything when `obj` would not load back with `weights_only=True`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except Exception as e:
        raise TypeError(
            f"{what} holds a type that torch.load(weights_only=True) refuses, so a resume could not read "
            f"it; store only tensors, numbers, strings, lists and dicts (e.g. str(path), asdict(config)): {e}"
        ) from e


def _merged_peft_state_dict(peft_model) -> dict:
    """The base model's state dict with every LoRA layer's delta added to its weight, peft names removed."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    merged = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight.detach()
            if not module.merged:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            merged[f"{name}.weight"] = weight
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        state[key] = merged.get(key, value)
    return state


def _save_model(model, directory: Path, state_dict: dict | None = None) -> None:
    model = getattr(model, "module", model)  # DistributedDataParallel
    if state_dict is not None:  # FSDP: the full weights, gathered beforehand (cppo.rl.sharded)
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    elif hasattr(model, "get_base_model"):  # peft: merged weights loadable as a plain model, plus the adapter
        base = model.get_base_model()
        base.save_pretrained(directory, state_dict=_merged_peft_state_dict(model), safe_serialization=True)
        model.save_pretrained(directory / "adapter", safe_serialization=True)
    else:
        model.save_pretrained(directory, safe_serialization=True)


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` is not a usable complete checkpoint ("no COMPLETE marker", "model.safetensors is
    missing", ...), or None when it is. Cheap: names and sizes only (`checkpoint_corruption` reads
    the bytes)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return "not a directory"
    problem = manifest_problem(ckpt)
    if problem:
        return problem
    if not (ckpt / TRAINER_STATE).is_file():
        return f"{TRAINER_STATE} is missing"
    if not any(ckpt.glob("*.safetensors")) and not (ckpt / SHARDS / ".metadata").is_file():
        return "no weights (*.safetensors, or shards/.metadata from an FSDP run)"
    return None


def _step_dirs(ckpt_root: Path, complete: bool = True) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints under `ckpt_root` (the complete ones, or the incomplete ones
    with `complete=False`), oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for path in ckpt_root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir() and (checkpoint_problem(path) is None) == complete:
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    processor,
    optimizer,
    scheduler,
    trainer_state: dict,
    keep_last: int = 2,
    keep: tuple[Path, ...] = (),
) -> Path:
    """Write `run_dir/checkpoints/step-{step:06d}/` atomically and prune to the last `keep_last` (0 = all).

    The checkpoint just written is always kept, whatever its step, and so are the folders in `keep`
    (the best one, with --keep-best), outside the count. A failure leaves no partial final folder and
    the previous checkpoints untouched; an OSError (full disk, permissions) is raised as RunDirError
    naming the folder.
    """
    optimizer_state = optimizer.state_dict() if optimizer is not None else None
    state = full_trainer_state(optimizer_state, scheduler, trainer_state)
    final = checkpoint_dir(run_dir, step)
    root = final.parent

    def write(tmp: Path) -> None:
        tmp.mkdir()
        with writes_as_oserror(tmp):
            _save_model(model, tmp)
        processor.save_pretrained(tmp)
        with writes_as_oserror(tmp):
            torch.save(state, tmp / TRAINER_STATE)
        write_marker(tmp, step)

    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write(final, write, tmp=root / f".tmp-{final.name}")
    except OSError as e:
        raise write_error(run_dir, final, e) from e
    prune(final, keep_last, keep)
    return final


@contextmanager
def writes_as_oserror(directory: Path):
    """Inside the block, a file writer's failure is an OSError, as a full disk is for `open`.

    torch.save's zip writer raises RuntimeError ("unexpected pos ...", "PytorchStreamWriter failed
    writing file") and safetensors raises SafetensorError when the disk fills, so without this a
    full disk would escape the one-line error (exit 2) that every other write failure gets."""
    try:
        yield
    except (RuntimeError, SafetensorError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OSError(errno.EIO, f"writing into {directory.name} failed: {first}") from e


def full_trainer_state(optimizer_state: dict | None, scheduler, trainer_state: dict) -> dict:
    """What `trainer_state.pt` holds; raises TypeError, before anything is written, when a part
    other than the optimizer state would not load back with `weights_only=True`."""
    scheduler_state = scheduler.state_dict() if scheduler is not None else None
    state = {"optimizer": optimizer_state, "scheduler": scheduler_state, **trainer_state}
    _check_weights_only({k: v for k, v in state.items() if k != "optimizer"}, "trainer_state")
    return state


def write_error(run_dir: Path, final: Path, e: OSError) -> RunDirError:
    """The RunDirError for a checkpoint `final` that could not be written (`e` itself if it is one)."""
    if isinstance(e, RunDirError):
        return e
    previous = latest_checkpoint(run_dir)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
    return RunDirError(
        f"could not write checkpoint {final} ({e.strerror or e}); {kept}. "
        "Free space or fix permissions, then resume"
    )


def prune(final: Path, keep_last: int, keep: tuple[Path, ...] = ()) -> None:
    """Delete the oldest checkpoints beside `final` beyond `keep_last` (0 = keep all) but `keep`."""
    if keep_last > 0:
        protected = {Path(p) for p in keep}
        others = [p for _, p in _step_dirs(final.parent) if p != final and p not in protected]
        for path in others[: max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------- loading


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives: run_dir/checkpoints/step-NNNNNN."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{int(step):06d}"


def write_best(run_dir: Path, step: int, score: float, metric: str) -> None:
    """Record (atomically) which complete checkpoint scored best on `metric`: checkpoints/best.json."""
    name = checkpoint_dir(".", step).name
    record = {"step": int(step), "metric": metric, "score": float(score), "path": name}
    atomic_write(Path(run_dir) / CHECKPOINTS_DIR / BEST_FILE, json.dumps(record) + "\n")


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint recorded in checkpoints/best.json, if it is there and complete."""
    path = Path(run_dir) / CHECKPOINTS_DIR / BEST_FILE
    if not path.is_file():
        return None
    try:
        ckpt = checkpoint_dir(run_dir, json.loads(path.read_text())["step"])
    except (ValueError, KeyError, TypeError):  # damaged: as if no best were recorded
        return None
    return ckpt if checkpoint_problem(ckpt) is None else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step (temporary and unmarked folders ignored), or None."""
    found = _step_dirs(Path(run_dir) / CHECKPOINTS_DIR)
    return found[-1][1] if found else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of `run_dir` (names and sizes checked, not contents), oldest first."""
    return [p for _, p in _step_dirs(Path(run_dir) / CHECKPOINTS_DIR)]


def checkpoint_corruption(ckpt: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """Why the bytes of a complete checkpoint are not those it was saved with (a file whose sha256
    differs from its manifest's: changed in place, same size), or None. Reads every file, so it is
    run only on the checkpoint a run resumes from (cppo.rl.manifest says what that costs).

    With `world_size` > 1 it reads only process `rank`'s share of the files (`hash_shares`, by the
    manifest's sizes): the caller gathers every process's verdict (cppo.rl.resume)."""
    if world_size == 1:
        return content_problem(ckpt)
    try:
        manifest = read_manifest(ckpt)
    except (OSError, ValueError):
        return content_problem(ckpt)  # fails the same way before hashing, and says why
    sizes = {name: manifest["files"].get(name, 0) for name in manifest.get("sha256", {})}
    return content_problem(ckpt, hash_shares(sizes, world_size)[rank])


def hash_shares(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """The files of `sizes` ({name: bytes}) split into `parts` shares of about equal bytes, the same
    on every process: the largest file first, each to the share with the fewest bytes so far (the
    lowest index on a tie). A file is one process's to read, so a share is at least its largest file."""
    shares: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        k = loads.index(min(loads))
        shares[k].append(name)
        loads[k] += sizes[name]
    return shares


def set_aside(ckpt: Path, why: str = "corrupt") -> Path:
    """Rename `ckpt` to `step-NNNNNN.{why}` (or `.{why}-K`, the first free K) beside it, so that no
    listing picks it again; its files stay for inspection. Returns the new path."""
    ckpt = Path(ckpt)
    target, k = ckpt.with_name(f"{ckpt.name}.{why}"), 1
    while target.exists():
        k += 1
        target = ckpt.with_name(f"{ckpt.name}.{why}-{k}")
    os.replace(ckpt, target)
    return target


def incomplete_checkpoints(run_dir: Path) -> list[tuple[Path, str]]:
    """(path, problem) of every `step-*` folder that `latest_checkpoint` ignores, oldest first."""
    return [
        (p, checkpoint_problem(p)) for _, p in _step_dirs(Path(run_dir) / CHECKPOINTS_DIR, complete=False)
    ]


def checkpoint_step(ckpt: Path) -> int | None:
    """The step in a `step-NNNNNN` folder name, or None for another name."""
    m = _STEP_DIR.match(Path(ckpt).name)
    return int(m.group(1)) if m else None


def newer_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """The complete checkpoints of `run_dir` after `step`: what a resume from `step` would abandon."""
    return [p for s, p in _step_dirs(Path(run_dir) / CHECKPOINTS_DIR) if s > step]


def load_trainer_state(ckpt: Path) -> dict:
    """`trainer_state.pt` of a checkpoint, loaded with `weights_only=True` on CPU (never runs its code)."""
    path = Path(ckpt) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {ckpt} is not a complete checkpoint")
    return torch.load(path, weights_only=True, map_location="cpu")
