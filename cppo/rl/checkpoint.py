"""Atomic checkpoints, RNG states that load with `weights_only=True`, and a write probe for the run dir.

A checkpoint is a directory `run_dir/checkpoints/step-{step:06d}/` holding

- the model (`model.save_pretrained`, safetensors) and processor: `from_pretrained` /
  `cppo.models.load_model_and_processor` load it as a plain Qwen2.5-VL. A peft (LoRA) model is
  saved with its adapters merged into the weights, and its adapter alone under `adapter/` (what a
  resume loads with `PeftModel.from_pretrained(base, ckpt / "adapter", is_trainable=True)`).
- `trainer_state.pt`: `{"optimizer": ..., "scheduler": ..., **trainer_state}` (step, sampler state,
  RNG states, config dict), read back by `load_trainer_state` with `weights_only=True` only.
- `COMPLETE`, written last: a JSON manifest `{"step": N, "files": {relative path: size}}` of every
  other file. A checkpoint counts as complete only when the marker is there and every file it lists
  exists with its size (`checkpoint_problem`), so a folder copied by hand and cut short, or one whose
  disk lost a file, is ignored by `latest_checkpoint` (markers of the older `step N` form are checked
  for the trainer state and the weights only).

Everything is written into a temporary sibling `.tmp-step-...`, every file and folder fsynced, then
renamed to its final name and the parent fsynced: a kill at any moment leaves the previous complete
checkpoint and, at worst, a temporary folder that `latest_checkpoint` ignores and the next save
removes. Older checkpoints are pruned only after the new one is in place.

Call `save_checkpoint` on the main process only (with DDP every rank holds the same weights and
optimizer state; `capture_rng` is per process).

Resuming: `resume_point(cfg, run_dir, data_fingerprint(dataset), rank)` picks the checkpoint
(`--resume auto`: the latest complete one) and refuses, with one line listing why, a checkpoint that
is incomplete or unreadable with `weights_only`, a config that changed a field outside
`RESUME_SAFE_FIELDS` (run length, logging, saving, evaluation, compute layout may change), data whose
samples changed, or abandoning newer checkpoints of the same run, unless `force_resume` (which then
deletes those newer checkpoints, so a later `--resume auto` cannot pick the abandoned branch).

Stopping: `StopSignals` turns the first SIGTERM/SIGINT into a request the loop honours after the
step (or at once, as `AbortStep`, inside a section that changes no weights), and a second one into
KeyboardInterrupt; the loop checkpoints and raises `RunInterrupted` (exit status 128 + signal).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from cppo.rl.config import ConfigError
from cppo.rl.runlog import fsync_dir

CHECKPOINTS_DIR = "checkpoints"
MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
BEST_FILE = "best.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class RunDirError(OSError):
    """The run directory (or a checkpoint in it) cannot be written; the message says what to do."""


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


# ----------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict:
    """Python, numpy (global), torch CPU and every CUDA generator state, as tensors/ints/lists/strings."""
    version, internal, gauss = random.getstate()
    # The legacy global generator is what third-party code (and np.random.* calls) draws from.
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "name": str(name),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Set the generators from `capture_rng()` output (CUDA ones when both the state and a GPU have them)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            npy["name"],
            np.asarray(npy["keys"], dtype=np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) != torch.cuda.device_count():
            raise RuntimeError(
                f"the checkpoint has RNG states for {len(cuda)} GPUs, this process sees "
                f"{torch.cuda.device_count()}: resume with the same CUDA_VISIBLE_DEVICES"
            )
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ----------------------------------------------------------------------------------------- saving


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder (deepest first), under and including `root`."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


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
    if state_dict is not None:  # FSDP: the full weights, gathered by every process beforehand
        model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    elif hasattr(model, "get_base_model"):  # peft: merged weights loadable as a plain model, plus the adapter
        base = model.get_base_model()
        base.save_pretrained(directory, state_dict=_merged_peft_state_dict(model), safe_serialization=True)
        model.save_pretrained(directory / "adapter", safe_serialization=True)
    else:
        model.save_pretrained(directory, safe_serialization=True)


def _manifest(directory: Path) -> dict[str, int]:
    """{relative path: size in bytes} of every file under `directory`."""
    return {
        str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()
    }


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` is not a usable complete checkpoint ("no COMPLETE marker", "model.safetensors is
    missing", ...), or None when it is."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return "not a directory"
    marker = ckpt / MARKER
    if not marker.is_file():
        return f"no {MARKER} marker (a save that did not finish)"
    try:
        files = json.loads(marker.read_text()).get("files", {})
    except (ValueError, AttributeError):  # the older `step N` marker: no manifest
        files = {}
    for name, size in files.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size} (truncated)"
    if not (ckpt / TRAINER_STATE).is_file():
        return f"{TRAINER_STATE} is missing"
    if not any(ckpt.glob("*.safetensors")):
        return "no *.safetensors weights"
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
    model_state: dict | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write `run_dir/checkpoints/step-{step:06d}/` atomically and prune to the last `keep_last` (0 = all).

    The checkpoint just written is always kept, whatever its step, and so are the folders in `keep`
    (the best one, with --keep-best), outside the count. A failure leaves no partial final folder and
    the previous checkpoints untouched; an OSError (full disk, permissions) is raised as RunDirError
    naming the folder. `model_state` / `optimizer_state`: full states gathered from an FSDP model
    (cppo.rl.fsdp), used instead of the model's and optimizer's own.
    """
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    state = {
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        **trainer_state,
    }
    _check_weights_only({k: v for k, v in state.items() if k != "optimizer"}, "trainer_state")

    final = checkpoint_dir(run_dir, step)
    root, name = final.parent, final.name
    tmp = root / f".tmp-{name}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a run killed while saving
            shutil.rmtree(tmp)
        tmp.mkdir()
        _save_model(model, tmp, model_state)
        processor.save_pretrained(tmp)
        torch.save(state, tmp / TRAINER_STATE)
        (tmp / MARKER).write_text(json.dumps({"step": int(step), "files": _manifest(tmp)}, indent=1) + "\n")
        _fsync_tree(tmp)
        if final.exists():  # a re-save of the same step: move the old one aside, then swap
            old = root / f".old-{name}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(root)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, RunDirError):
            previous = latest_checkpoint(run_dir)
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint"
            raise RunDirError(
                f"could not write checkpoint {final} ({e.strerror or e}); {kept}. "
                "Free space or fix permissions, then resume"
            ) from e
        raise

    if keep_last > 0:
        protected = {Path(p) for p in keep}
        others = [p for _, p in _step_dirs(root) if p != final and p not in protected]
        for path in others[: max(0, len(others) - (keep_last - 1))]:
            shutil.rmtree(path, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------------------- loading


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` lives: run_dir/checkpoints/step-NNNNNN."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{int(step):06d}"


def write_best(run_dir: Path, step: int, score: float, metric: str) -> None:
    """Record (atomically) which complete checkpoint scored best on `metric`: checkpoints/best.json."""
    path = Path(run_dir) / CHECKPOINTS_DIR / BEST_FILE
    tmp = path.with_name(f".{BEST_FILE}.tmp")
    record = {
        "step": int(step),
        "metric": metric,
        "score": float(score),
        "path": checkpoint_dir(".", step).name,
    }
    tmp.write_text(json.dumps(record) + "\n")
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint recorded in checkpoints/best.json, if it is there and complete."""
    path = Path(run_dir) / CHECKPOINTS_DIR / BEST_FILE
    if not path.is_file():
        return None
    ckpt = checkpoint_dir(run_dir, json.loads(path.read_text())["step"])
    return ckpt if checkpoint_problem(ckpt) is None else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step (temporary and unmarked folders ignored), or None."""
    found = _step_dirs(Path(run_dir) / CHECKPOINTS_DIR)
    return found[-1][1] if found else None


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


# Fields a resume may change without changing what is trained (a longer run, other logging, another
# compute layout). Every other field differing from the checkpoint's config is refused unless forced.
# max_steps is here although it stretches a linear/cosine schedule: the loop warns when it does.
RESUME_SAFE_FIELDS = frozenset(
    """max_steps save_every keep_last keep_best eval_every eval_samples eval_data log_rollouts resume
    force_resume tensorboard output_dir device micro_batch_size logits_chunk_size gradient_checkpointing
    data_strict max_bad_steps""".split()
)


def config_changes(saved: dict, current: dict, safe=RESUME_SAFE_FIELDS) -> list[str]:
    """`["group_size 2 -> 3", ...]`: fields in both configs, outside `safe`, whose values differ.

    A field only one side has (a config from another version) is not compared."""
    changes = []
    for key in saved:
        if key in current and key not in safe and _norm(saved[key]) != _norm(current[key]):
            changes.append(f"{key} {saved[key]!r} -> {current[key]!r}")
    return changes


def _norm(value):
    return list(value) if isinstance(value, tuple) else value


def load_trainer_state(ckpt: Path) -> dict:
    """`trainer_state.pt` of a checkpoint, loaded with `weights_only=True` on CPU (never runs its code)."""
    path = Path(ckpt) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {ckpt} is not a complete checkpoint")
    return torch.load(path, weights_only=True, map_location="cpu")


# ----------------------------------------------------------------------------------------- resuming


def data_fingerprint(dataset) -> str:
    """A hash of the samples' questions, answers, types and image references, in order."""
    h = hashlib.sha256()
    for r in dataset.records:
        images = [i if isinstance(i, str) else type(i).__name__ for i in r.images]
        h.update(json.dumps([r.question, r.answer, r.question_type, images], default=str).encode())
    return h.hexdigest()[:16]


def resume_point(cfg, run_dir: Path, fingerprint: str, rank: int = 0):
    """(checkpoint, its trainer state) to resume from, or (None, None); refuses (ConfigError) an
    incomplete checkpoint, a changed config or data, and abandoning newer checkpoints, unless forced."""
    if not cfg.resume:
        return None, None
    if cfg.resume == "auto":
        if rank == 0:
            for path, problem in incomplete_checkpoints(run_dir):
                print(f"[cppo] ignoring incomplete checkpoint {path}: {problem}", file=sys.stderr)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            if rank == 0:
                print(f"[cppo] resume auto: no complete checkpoint in {run_dir}; starting at step 0")
            return None, None
    else:
        ckpt = Path(cfg.resume)
        problem = checkpoint_problem(ckpt)
        if problem:
            raise ConfigError(
                f"cannot resume from {ckpt}: {problem}; give a complete checkpoint or --resume auto"
            )
    try:
        state = load_trainer_state(ckpt)  # weights_only: never runs code from the checkpoint
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot read {ckpt / 'trainer_state.pt'} with torch.load(weights_only=True) ({first}); "
            "nothing in it was executed. It was not written by cppo-train or was altered: resume from "
            "another checkpoint"
        ) from None
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
    if changes and rank == 0:
        print(f"[cppo] --force-resume from {ckpt} despite: {'; '.join(changes)}", file=sys.stderr)
    if rank == 0:
        for path in newer:  # so that a later --resume auto cannot pick the abandoned branch
            shutil.rmtree(path)
    return ckpt, state


# ----------------------------------------------------------------------------------------- stopping


class RunInterrupted(Exception):
    """SIGTERM/SIGINT stopped the run after its last completed step was checkpointed."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum


class AbortStep(BaseException):
    """Raised by the signal handler inside an abortable section (BaseException: reward code that
    catches Exception cannot swallow it)."""


class StopSignals:
    """SIGTERM and SIGINT handling for the loop (installed on the main thread only).

    The first signal raises AbortStep inside `abortable()` sections, else sets a flag that
    `requested()` reads after the step; a second signal raises KeyboardInterrupt at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._abortable = False
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without saving")
        self.signum = signum
        name = signal.Signals(signum).name
        if self._abortable:
            self._abortable = False
            print(
                f"\n[cppo] {name}: abandoning this step's rollout, saving the last completed step",
                file=sys.stderr,
            )
            raise AbortStep()
        print(f"\n[cppo] {name}: finishing this step, then saving and stopping", file=sys.stderr)

    @contextmanager
    def abortable(self, enabled: bool = True):
        self._abortable = enabled
        try:
            yield
        finally:
            self._abortable = False

    def requested(self, world: int, device) -> bool:
        """Whether any process got a signal (an all-reduce with several processes, so all stop together)."""
        flag = self.signum is not None
        if world > 1:
            import torch.distributed as dist

            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self.signum is None:
                self.signum = signal.SIGTERM
        return flag

    def interrupted(self, step: int, saved: Path | None) -> RunInterrupted:
        name = signal.Signals(self.signum).name
        where = f"checkpoint {saved}" if saved else "no new checkpoint (no step completed)"
        return RunInterrupted(
            self.signum, f"stopped by {name} after step {step}; {where}; continue with --resume auto"
        )
