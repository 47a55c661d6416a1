"""What a run will do, before it does it: ``cppo-train --dry-run``.

    cppo-train --config examples/configs/cppo-3b.yaml --dry-run --dry-run-gpus 8

Prints the resolved config, then the plan: the training data after the preprocessing (samples,
steps per epoch, and the run's length when ``epochs`` sets it), the optimizer updates per step, and
the memory per GPU from cppo.rl.memory, without loading a model. What it cannot know it says:

- the data: read here without decoding the images (a run decodes them and may skip a few more
  unreadable ones); a source that cannot be read here (a hub id with no network, a path on another
  machine) leaves the steps per epoch unknown, with the reason, and the rest is printed;
- prompt lengths: counted with the model's processor (its tokenizer files, a local folder or the
  hub cache); without it the count is an upper bound, before the max_prompt_length filter;
- the model's shape: from its config.json (a local folder or the hub cache), else the published
  sizes of Qwen2.5-VL-3B/7B when the model's name says which (``SHAPES``), else unknown; a config.json
  that is there but cannot be used (not JSON, not a Qwen2.5-VL's) is refused in one line, as the run
  would refuse it;
- the processes: ``--dry-run-gpus N``, else the launch's (``WORLD_SIZE``), else 1; FSDP when the
  launch exports an accelerate FSDP config, and otherwise both layouts are shown when N > 1;
- the run directory: new, resumed, or holding an earlier run that the run would refuse (or, with
  ``--overwrite``, delete) (cppo.rl.rundir).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path

from cppo.models import demo_model_path
from cppo.models.model_dir import read_config
from cppo.rl.checks import Preprocessing
from cppo.rl.config import ConfigError, TrainConfig
from cppo.rl.data import PromptDataset
from cppo.rl.fsdp import fsdp_settings
from cppo.rl.generation import MAX_GENERATION_ROWS
from cppo.rl.launch import resolve_max_steps, steps_per_epoch
from cppo.rl.memory import GIB, SHAPES, ModelShape, RunShape, estimate
from cppo.rl.prompt_count import data_processor
from cppo.rl.rundir import earlier_run, entry_names
from cppo.rl.sources import DataError, parse_columns, read_source

PASSES = {"grpo": 1, "papo": 2, "cppo": 3}  # forward passes alive before one backward (anchor, views)
SHAPES_TASK_SAMPLES = 4000  # shapes_data's n_train: the default task's training split
COLUMNS = [
    ("master_weights", "master"),
    ("gradients", "grads"),
    ("optimizer", "AdamW"),
    ("reference", "reference"),
    ("compute_copy", "compute copy"),
    ("kv_cache", "KV cache"),
    ("activations", "activations"),
    ("peak", "peak"),
]


def processes(gpus: int | None) -> int:
    """--dry-run-gpus, else the launch's WORLD_SIZE (torchrun, accelerate launch), else 1."""
    return gpus if gpus is not None else int(os.environ.get("WORLD_SIZE", "1"))


def updates_per_step(cfg: TrainConfig, world: int) -> int:
    """Optimizer updates per step, as the run computes them (cppo.rl.run)."""
    n_local = cfg.rollouts // world
    mini_local = (cfg.mini_batch_size or cfg.rollouts) // world
    return cfg.ppo_epochs * math.ceil(n_local / max(1, mini_local))


def count_samples(cfg: TrainConfig) -> tuple[int | None, str]:
    """(training samples after the preprocessing, or None when unknown; a line saying how they were
    counted)."""
    if cfg.data is None:
        return (
            SHAPES_TASK_SAMPLES,
            f"the shapes task, {SHAPES_TASK_SAMPLES} samples (exported when the run starts)",
        )
    try:
        rows = read_source(cfg.data, "train", parse_columns(cfg.data_columns), cfg.data_image_root)
    except (DataError, OSError) as e:
        return None, f"{cfg.data}: unknown here ({_line(e)})"
    prep, processor, note = Preprocessing.of(cfg), None, ""
    if prep.max_prompt_length:
        try:
            processor = data_processor(cfg)
        except (OSError, ConfigError) as e:  # FileNotFoundError: a hub id not in the cache
            prep = dataclasses.replace(prep, max_prompt_length=None)
            note = f"; an upper bound: prompt lengths need the model's processor ({_line(e)})"
    try:
        ds = PromptDataset(rows, cfg.data_strict, verify_images=False, prep=prep, processor=processor)
    except (DataError, OSError) as e:
        return None, f"{cfg.data}: unknown here ({_line(e)})"
    return len(ds), ds.summary() + note


def model_shape(cfg: TrainConfig) -> tuple[ModelShape | None, str]:
    """(the model's shape, where it came from) from its config.json, else from its name, else None.
    A config.json that is there but unusable (not JSON, another model type) is a ConfigError, one line."""
    name = str(cfg.model or demo_model_path())
    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = (
            try_to_load_from_cache(name, "config.json") if "/" in name and not path.parent.exists() else None
        )
        path = Path(cached) if isinstance(cached, str) else None
    if path is not None:
        from transformers import AutoConfig

        try:  # not JSON, not a Qwen2.5-VL's: the run would refuse it too (cppo.models.model_dir)
            read_config(path.parent)
            config = AutoConfig.from_pretrained(path.parent)
        except (ValueError, OSError) as e:  # ModelError is a ValueError
            raise ConfigError(_line(e)) from None
        return ModelShape.from_config(config), f"{name} (its config.json)"
    size = re.search(r"(?i)-(3b|7b)\b", name)
    if size:
        return SHAPES[size.group(1).lower()], (
            f"{name} (Qwen2.5-VL-{size.group(1).upper()}'s published sizes: its config.json is not here)"
        )
    return None, f"{name}: shape unknown (no config.json here, and the name does not say 3B or 7B)"


def memory_table(cfg: TrainConfig, shape: ModelShape, world: int, fsdp_launch: bool | None) -> str:
    """GiB per GPU of each part, one row per layout (FSDP2 or replicated) that this launch may use."""
    if fsdp_launch is None:  # not launched: the layouts the config allows on `world` processes
        layouts = [True, False] if world > 1 and not cfg.lora_r else [False]
    else:
        layouts = [fsdp_launch]
    unit = GIB if estimate(shape, run_shape(cfg, shape, world, False))["peak"] >= GIB else 2**20
    lines = [
        f"| layout ({'GiB' if unit == GIB else 'MiB'}) | " + " | ".join(label for _, label in COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for fsdp in layouts:
        run = run_shape(cfg, shape, world, fsdp)
        parts = estimate(shape, run)
        frozen = _frozen_float32(shape, run)
        parts["master_weights"] += frozen
        parts["peak"] += frozen
        label = "FSDP2" if fsdp else ("1 GPU" if world == 1 else "replicated")
        lines.append(f"| {label} | " + " | ".join(_size(parts[key], unit) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def _size(n: float, unit: int) -> str:
    return f"{n / unit:.1f}"


def run_shape(cfg: TrainConfig, shape: ModelShape, world: int, fsdp: bool) -> RunShape:
    """The memory model's options from the config, for a CUDA run (bf16 compute unless --dtype float32)."""
    local = max(1, cfg.rollouts // world)
    rows = cfg.generation_batch_size or MAX_GENERATION_ROWS  # none: sized from free CUDA memory, at most this
    rows = min(local, max(cfg.group_size, rows // cfg.group_size * cfg.group_size))
    return RunShape(
        gpus=world,
        fsdp=fsdp,
        pure_bf16=cfg.pure_bf16,
        reference=reference_placement(cfg, fsdp),
        generate_rows=rows,
        micro_rows=cfg.micro_batch_size,
        prompt_tokens=cfg.max_prompt_length or 512,
        response_tokens=cfg.max_new_tokens,
        passes=PASSES.get(cfg.algo, 3),
        checkpointing=bool(cfg.gradient_checkpointing),  # auto: on with CUDA
        compute_bytes=4 if cfg.dtype == "float32" else 2,
        chunk=cfg.logits_chunk_size,
        trainable_fraction=trainable_fraction(cfg, shape),
    )


def reference_placement(cfg: TrainConfig, fsdp: bool) -> str:
    """Where the frozen reference lives (cppo.rl.reference): none without the KL term, in CPU
    memory under --ref-offload, sharded like the policy under FSDP, else a full copy per GPU."""
    if cfg.beta == 0:
        return "none"
    if cfg.ref_offload:
        return "cpu"
    return "sharded" if fsdp else "full"


def trainable_fraction(cfg: TrainConfig, shape: ModelShape) -> float:
    """The share of the parameters the optimizer updates: LoRA's adapters on the language model's
    projections named in lora_targets, or everything but the vision tower with freeze_vision."""
    h, kv, inter = shape.hidden, shape.kv_dim, shape.intermediate
    if cfg.lora_r:
        sides = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
        sides |= {"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
        per_layer = sum(cfg.lora_r * sum(sides[t]) for t in cfg.lora_targets if t in sides)
        return per_layer * shape.layers / shape.params()
    if cfg.freeze_vision:
        return shape.text_params() / shape.params()
    return 1.0


def _frozen_float32(shape: ModelShape, run: RunShape) -> float:
    """Bytes the memory model leaves out for frozen weights: it counts them in bf16, and this trainer
    loads every weight in float32 (the master dtype, cppo.rl.policy.build_policy)."""
    return 2 * shape.params() * (1 - run.trainable_fraction) if not run.pure_bf16 else 0.0


def describe(cfg: TrainConfig, gpus: int | None = None) -> str:
    """The plan printed after the resolved config (module docstring)."""
    world = processes(gpus)
    source = (
        "--dry-run-gpus" if gpus is not None else ("WORLD_SIZE" if "WORLD_SIZE" in os.environ else "default")
    )
    fsdp_launch = True if fsdp_settings() is not None else (False if "WORLD_SIZE" in os.environ else None)
    samples, data_line = count_samples(cfg)
    lines = [f"data: {data_line}"]
    if samples is None:
        lines.append("steps per epoch: unknown (the data is not readable here)")
    else:
        rule = "whole steps: drop_last" if cfg.drop_last else "one stream across epochs"
        lines.append(
            f"steps per epoch: {steps_per_epoch(cfg, samples):.1f} ({samples} samples / "
            f"{cfg.prompts_per_step} prompts a step, {rule})"
        )
    # drop_last with fewer samples than one step is refused here, as the run would refuse it
    if samples is not None and resolve_max_steps(cfg, samples):
        lines.append(f"max_steps: {cfg.max_steps} ({cfg.epochs:g} epochs)")
    elif cfg.max_steps is None:
        lines.append(f"max_steps: unknown until the data is read ({cfg.epochs:g} epochs)")
    else:
        lines.append(f"max_steps: {cfg.max_steps}")
    mini = cfg.mini_batch_size or cfg.rollouts
    lines.append(
        f"updates per step: {updates_per_step(cfg, world)} ({cfg.rollouts} rollouts = {cfg.prompts_per_step} "
        f"prompts x {cfg.group_size}, mini-batches of {mini}, ppo_epochs {cfg.ppo_epochs})"
    )
    lines.append(f"processes: {world} ({source}); rollouts per process: {cfg.rollouts // max(1, world)}")
    lines.append(f"run directory: {run_dir_line(cfg)}")
    shape, model_line = model_shape(cfg)
    lines.append(f"model: {model_line}")
    if shape is None:
        lines.append("memory per GPU: unknown")
        return "\n".join(lines)
    rows = run_shape(cfg, shape, world, False).generate_rows
    lines += [
        f"memory per GPU ({shape.params() / 1e6:,.0f} M parameters; cppo.rl.memory: every response at "
        f"{cfg.max_new_tokens} tokens, generate calls of {rows} rows, bf16 compute on CUDA, frozen "
        "weights in float32):",
        memory_table(cfg, shape, world, fsdp_launch),
    ]
    return "\n".join(lines)


def run_dir_line(cfg: TrainConfig) -> str:
    """What the run will do with its output_dir (cppo.rl.rundir.check_fresh decides it at launch)."""
    found = earlier_run(Path(cfg.output_dir))
    if not found:
        return f"{cfg.output_dir} (new)"
    held = f"{cfg.output_dir} holds an earlier run ({entry_names(found)})"
    if cfg.resume:
        return f"{held}: resumed (--resume {cfg.resume})"
    if cfg.overwrite:
        return f"{held}: deleted once the run's checks pass (--overwrite)"
    return f"{held}: the run would be refused; pass --resume auto or --overwrite, or another --output-dir"


def _line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
