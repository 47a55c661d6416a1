"""The trainer's configuration: one documented dataclass, a YAML file for defaults, flags on top.

Letters: B prompts per step, G rollouts per prompt (the group), N = B·G rollouts per step.

Precedence, lowest first: the dataclass defaults, ``--config FILE.yaml``, then flags. transformers'
``HfArgumentParser`` makes a flag of every field (``group_size`` -> ``--group-size 8`` or
``--group_size 8``; booleans as ``--x``, ``--x false`` or ``--no-x``; lists take several values;
``none`` sets an optional field to None); as in TRL's ``TrlParser``, the file's values become the
parser's defaults, so flags override them. ``parse_args(argv)`` returns a validated ``TrainConfig``;
``TrainConfig.save(path)`` writes the resolved config a run can be restarted from. The checks that
need the launch (process count, FSDP) are ``check_launch``, called by the training loop.

Defaults are sized for the no-argument demo (the bundled tiny model on the shapes task, a few
minutes on CPU); each help text gives the paper's value where it differs (docs/method.md §4: 512 prompts
x G=5, 8 updates per step, lr 1e-6, 4096 new tokens). Batch sizes below the step are counted in
rollouts (as TRL's ``per_device_train_batch_size``), not prompts (as verl's mini-batch), so one
number means the same thing for the mini- and the micro-batch.

The file is long (~900 lines) because every field carries its help text and paper value, and the
rule "every check the trainer makes on the config lives here" keeps the parser, ``validate()`` and
``check_launch`` beside the fields they read.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
import typing
from argparse import ArgumentError, ArgumentTypeError
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers.hf_argparser import HfArgumentParser, string_to_bool

from cppo.loss import AGGREGATIONS, DIVERGENCES, GATES, POLICY_LOSSES, SELECTORS
from cppo.perturb import get_preset
from cppo.rl.perception import get_perception_term
from cppo.rl.rewards import get_reward, reward_name
from cppo.rl.sources import parse_columns

ALGOS = ("cppo", "grpo", "papo")  # the built-in perception terms (cppo.rl.perception)
DTYPES = ("auto", "float32", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("constant", "linear", "cosine")
DEFAULT_MAX_STEPS = 40  # the demo's run length, when neither max_steps nor epochs is given
_AT_LEAST_ONE = "max_steps prompts_per_step group_size micro_batch_size ppo_epochs logits_chunk_size \
max_new_tokens eval_samples".split()
_NON_NEGATIVE = "lr weight_decay grad_clip beta cpl_lambda papo_gamma papo_entropy_coef warmup_steps \
save_every keep_last eval_every log_rollouts lora_r lora_dropout max_bad_steps reward_timeout".split()


class ConfigError(ValueError):
    """A configuration the trainer cannot run; the message says what to change."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(
            default_factory=lambda d=default: list(d) if isinstance(d, list) else dict(d),
            metadata={"help": help, **kw},
        )
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- what to train on
    model: str | None = _f(None, "model directory or hub id; None = the bundled tiny demo model")
    data: str | None = _f(
        None,
        "training data: a JSONL file, a folder with data.jsonl or train/data.jsonl, "
        "a Hugging Face save_to_disk folder or a .parquet file; None = the shapes task, "
        "generated into <output_dir>/shapes",
    )
    eval_data: str | None = _f(
        None,
        "held-out data for eval_every (same formats); None = the val split next "
        "to the training data when there is one",
        resume_safe=True,
    )
    data_strict: bool = _f(
        False,
        "treat unusable samples (missing answer or image, corrupt image) as errors "
        "instead of skipping them with a count",
        resume_safe=True,
    )
    data_columns: str | None = _f(
        None,
        "sample field=column pairs for data whose columns have other names, e.g. "
        "image=picture,question=prompt (fields: image, question, answer, question_type); none = the "
        "usual names: images/image, question/problem, answer/ground_truth/solution, question_type/category",
    )
    eval_data_columns: str | None = _f(None, "the same for eval_data; none = data_columns", resume_safe=True)
    data_image_root: str | None = _f(
        None,
        "folder that relative image paths of --data resolve against; none = the data's own folder. A "
        "hub id has none: ViRL39K's images/... paths need the folder its images.zip was unpacked in",
    )
    data_allow_outside_images: bool = _f(
        False,
        "let image paths of the data point outside its folder (or --data-image-root): by default an "
        "absolute path elsewhere or a ../ path out of it is a skipped sample (an error under --data-strict)",
    )
    # --- the paper's preprocessing of the data (cppo/rl/data.py), on by default
    instruction: bool = _f(
        True,
        "append the paper's instruction (think in <think></think>, answer in \\boxed{}; docs/method.md §4) "
        "to every question; --no-instruction for data whose questions carry their own",
    )
    boxed_answer: bool = _f(
        True, "take the ground truth from the last \\boxed{} of an answer that has one (ViRL39K's answers)"
    )
    drop_multi_image: bool = _f(
        True,
        "leave out samples with more than one image, counted (paper: the official code takes one image); "
        "--no-drop-multi-image keeps them, each image with its own views",
    )
    min_image_side: int = _f(
        28,
        "upscale images whose shorter side is under this many pixels to it, aspect kept (paper: 28; 0 = off)",
    )
    max_prompt_length: int | None = _f(
        512,
        "leave out prompts over this many tokens (chat template, question, instruction and image tokens), "
        "counted and named; an error under --data-strict (paper: 512; none = keep every prompt)",
    )
    min_pixels: int | None = _f(
        None,
        "the processor resizes every image to at least this many pixels; none = the model processor's "
        "own (Qwen2.5-VL-Instruct: 3136, which the paper keeps)",
    )
    max_pixels: int | None = _f(
        None,
        "the processor resizes every image to at most this many pixels; none = the model processor's "
        "own (Qwen2.5-VL-Instruct: 12845056, which the paper keeps)",
    )
    algo: str = _f(
        "cppo",
        f"one of {'|'.join(ALGOS)}: the same loop; cppo adds the views and CPL, "
        "papo the masked-image KL term",
    )
    output_dir: str | None = _f(
        None,
        "run directory: config.yaml, metrics.jsonl, checkpoints, rollouts; none = runs/<algo> (runs/cppo, "
        "runs/grpo, runs/papo). A fresh run into one that holds an earlier run is refused unless --resume "
        "or --overwrite is given",
        resume_safe=True,
    )
    seed: int = _f(0, "seed of the data order, the views, the sampling and the initialisation of LoRA")
    # --- batch shape
    max_steps: int | None = _f(
        None,
        "training steps (one rollout batch each); none = from epochs when it is set, else "
        f"{DEFAULT_MAX_STEPS}",
        resume_safe=True,
    )
    epochs: float | None = _f(
        None,
        "passes over the training data, used when max_steps is none: max_steps = ceil(epochs x samples / "
        "prompts_per_step), samples counted after the preprocessing when the run opens the data "
        "(paper: 2; cppo-train --dry-run prints it)",
        resume_safe=True,
    )
    prompts_per_step: int = _f(16, "B, prompts per step (paper: 512)")
    rollouts_per_step: int | None = _f(
        None,
        "N, rollouts per step, instead of prompts_per_step (as TRL's "
        "generation_batch_size); must be divisible by group_size",
    )
    group_size: int = _f(8, "G, rollouts per prompt (paper: 5)")
    mini_batch_size: int | None = _f(
        None,
        "rollouts per optimizer update; None = all N of the step (one "
        "update per epoch). Paper: 320 (64 prompts x 5), 8 updates per step",
    )
    micro_batch_size: int = _f(
        4, "rollouts per forward/backward pass; gradients accumulate to a mini-batch", resume_safe=True
    )
    ppo_epochs: int = _f(1, "passes over the step's rollouts; updates per step = ppo_epochs x N / mini_batch")
    # --- optimiser
    lr: float = _f(
        1e-4,
        "AdamW learning rate (paper: 1e-6 on 3B/7B; 1e-4 is the demo model's, measured in docs/results.md); "
        "--learning-rate and the YAML key learning_rate (TRL's name) mean the same",
        aliases=["--learning-rate", "--learning_rate"],
    )
    weight_decay: float = _f(0.01, "AdamW weight decay")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    lr_schedule: str = _f("constant", f"learning-rate schedule after warmup, one of {'|'.join(SCHEDULES)}")
    warmup_steps: int = _f(
        3,
        "optimizer updates of linear warmup from 0 (Adam's first full-size steps can collapse a policy)",
    )
    grad_clip: float = _f(1.0, "max global gradient norm; 0 = no clipping")
    # --- GRPO
    beta: float = _f(0.01, "weight of the KL to a frozen reference model; 0 = no reference model is loaded")
    kl_estimator: str = _f("k3", "estimator of the KL to the reference, a registered divergence: k1|k2|k3")
    policy_loss: str = _f("vanilla", "a registered policy loss: vanilla (PPO-clip) | reinforce")
    clip_low: float = _f(0.2, "PPO ratio clip below 1 (ratio >= 1 - clip_low)")
    clip_high: float = _f(0.2, "PPO ratio clip above 1 (ratio <= 1 + clip_high; DAPO uses 0.28)")
    dual_clip: float | None = _f(3.0, "dual-clip bound c > 1 on negative advantages; None = off")
    loss_agg: str = _f(
        "token-mean",
        "aggregation of the per-token losses, a registered aggregation: "
        "token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm",
    )
    adv_std_scale: bool = _f(True, "divide advantages by the group std; --no-adv-std-scale is Dr. GRPO")
    temperature: float = _f(1.0, "rollout temperature; every teacher-forced pass divides logits by it")
    top_p: float = _f(1.0, "rollout nucleus sampling")
    top_k: int = _f(0, "rollout top-k sampling; 0 = off")
    repetition_penalty: float = _f(
        1.0,
        "rollout repetition penalty; 1 = off. Any other value samples from another distribution than "
        "the one trained (off-policy, which the PPO ratio does not correct). The checkpoint's own "
        "generation_config.json (Qwen2.5-VL-Instruct ships 1.05) is never applied to rollouts",
    )
    max_new_tokens: int = _f(96, "max response tokens (paper: 4096)")
    seed_per_prompt: bool = _f(
        False,
        "sample each prompt's group from its own seed (one generate call per prompt): rollouts then do "
        "not depend on the rest of the batch or on the number of processes",
    )
    generation_batch_size: int | None = _f(
        None,
        "rollout rows per generate call, rounded down to whole groups (at least one), so that one call's "
        "KV cache stays bounded; none = sized from memory on CUDA (half the free memory over one row's "
        "KV cache for prompt + max_new_tokens tokens, at most 256 rows), 64 on the CPU. With "
        "--seed-per-prompt the samples do not depend on it; without, one random stream runs through "
        "the calls, so another size draws other samples (docs/training.md)",
        resume_safe=True,
    )
    # --- CPPO
    cpl_lambda: float = _f(0.01, "lambda, weight of the Contrastive Perception Loss (paper: 0.01)")
    cpl_tau: float = _f(0.1, "tau, temperature of the CPL softplus (paper: 0.1)")
    cpl_divergence: str = _f(
        "k3",
        "divergence in CPL: k3 (paper) | k1 (official async port) | k2 | full "
        "(exact full-vocabulary KL, costs logits of all three views)",
    )
    cpl_gate: str = _f(
        "positive_advantage",
        "a registered gate choosing the responses that get CPL: "
        "positive_advantage (A > 0, paper) | correct | none",
    )
    selector: str = _f(
        "relative",
        "a registered perception-token selector: relative (dH / H(I-), paper) | "
        "raw (dH) | kl_shift (VPPO) | entropy (high-entropy 80/20)",
    )
    top_percent: float = _f(0.5, "rho, fraction of the candidate tokens each response keeps (paper: 0.5)")
    preset: str = _f(
        "paper",
        "perturbation preset (a registered name or a preset .yaml) giving each prompt its I+ and I- views",
    )
    # --- PAPO (arXiv 2507.06448), selected by --algo papo
    papo_gamma: float = _f(0.01, "weight of PAPO's implicit perception loss (KL to the masked-image policy)")
    papo_preset: str = _f("papo", "perturbation preset for PAPO's masked image")
    papo_entropy_coef: float = _f(0.03, "weight of PAPO's double-entropy regulariser; 0 = off")
    papo_clip: float | None = _f(None, "per-token cap on PAPO's divergence against KL hacking; None = off")
    # --- rewards
    rewards: list[str] = _f(
        ["accuracy", "format"],
        "reward functions: registered names or a user function "
        "as module:function or path.py:function, fn(response, answer, sample) -> float",
    )
    reward_weights: list[float] = _f([0.9, 0.1], "one weight per reward function (paper: 0.9, 0.1)")
    reward_timeout: float = _f(
        60.0,
        "seconds one reward call may take; a slower call scores 0 and is logged in reward_errors.jsonl "
        "(the call is abandoned on its thread); 0 = no limit",
        resume_safe=True,
    )
    # --- compute
    logits_chunk_size: int = _f(
        256, "response positions per chunk of the output head (entropy, log-probs)", resume_safe=True
    )
    sort_by_length: bool = _f(
        False,
        "sort each mini-batch's rows by length (prompt + response tokens) into its micro-batches, so "
        "that each micro-batch, cut to its own longest row, holds less padding. Same number and sizes "
        "of micro-batches, but other rows share a micro-batch: under token-mean aggregation (and for "
        "CPL) the update then weighs tokens differently, and K processes no longer equal one",
        resume_safe=True,
    )
    prefetch: bool = _f(
        True,
        "prepare the next step's prompts (images, views, processor outputs) in a background thread "
        "while the current step runs; same results as preparing them in turn",
        resume_safe=True,
    )
    dtype: str = _f(
        "auto",
        f"compute precision of the forwards, one of {'|'.join(DTYPES)}; auto = bfloat16 on CUDA, float32 "
        "else. Parameters, gradients and optimizer state stay float32 (master weights) unless --pure-bf16",
    )
    pure_bf16: bool = _f(
        False,
        "hold parameters, gradients and AdamW state in bfloat16 too, with no float32 master copy: saves "
        "about 8 of 16 bytes per parameter, but every update smaller than ~|w|/256 rounds away (at lr "
        "1e-6 about 99 percent of the weights never move). Needs bfloat16 compute",
    )
    device: str = _f(
        "auto",
        f"one of {'|'.join(DEVICES)}: auto = what accelerate picks (CUDA when present); cuda is refused "
        "when this torch sees no CUDA device. CUDA_VISIBLE_DEVICES and the launcher choose the GPUs",
        resume_safe=True,
    )
    dist_timeout: float = _f(
        3600.0,
        "seconds a collective between processes may wait (the process group's timeout; torch's NCCL "
        "default is 600): a process that stalled or died then stops the others with an error naming "
        "this option instead of a hang. The longest wait a healthy run has is the resume check, which "
        "reads every byte of the checkpoint (split across processes, but a file is read by one): the "
        "largest file of an unsharded 7B checkpoint, trainer_state.pt with AdamW (~56 GB), takes ~19 "
        "min at 50 MB/s (a slow network disk), so 3600 leaves three times that",
        resume_safe=True,
    )
    gradient_checkpointing: bool | str = _f(
        "auto",
        "recompute activations in backward: true | false | auto (on with CUDA, off on the CPU: "
        "docs/benchmarks.md measures the trade). Paper: on",
        resume_safe=True,
    )
    ref_offload: bool = _f(
        False,
        "keep the frozen reference's weights in CPU memory on a CUDA run; its passes still run on the "
        "GPU (unsharded: copied there for each step's reference pass; under FSDP: each unit's shard "
        "when gathered). No effect on the CPU",
        resume_safe=True,
    )
    freeze_vision: bool = _f(
        True,
        "freeze the vision tower and its merger; train only the language model (the demo's setting; "
        "--no-freeze-vision trains the whole model, as the paper configs in examples/configs do)",
    )
    lora_r: int = _f(0, "LoRA rank; 0 = full finetuning (LoRA needs peft installed)")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_targets: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "module names LoRA wraps")
    # --- run
    save_every: int = _f(
        0, "checkpoint every N steps (and at the end); 0 = only at the end", resume_safe=True
    )
    keep_last: int = _f(2, "checkpoints kept; older ones are deleted; 0 = keep all", resume_safe=True)
    export_pretrained: bool = _f(
        False,
        "under FSDP, every checkpoint also holds the gathered from_pretrained weights (model.safetensors, "
        "written by rank 0), not only each process's shards; the run's last checkpoint always does. "
        "Unsharded runs always save from_pretrained weights",
        resume_safe=True,
    )
    keep_best: bool = _f(
        False,
        "also keep the checkpoint with the best eval/accuracy (checkpoints/best.json names it), outside "
        "keep_last; needs eval_every",
        resume_safe=True,
    )
    eval_every: int = _f(0, "evaluate on eval_data every N steps; 0 = never", resume_safe=True)
    eval_samples: int = _f(1, "K of the periodic avg@K evaluation", resume_safe=True)
    log_rollouts: int = _f(4, "rollouts per step written to rollouts.jsonl; 0 = none", resume_safe=True)
    resume: str | None = _f(
        None,
        "checkpoint folder to resume from, or auto = the latest complete one in output_dir "
        "(none there: start at step 0)",
        resume_safe=True,
    )
    overwrite: bool = _f(
        False,
        "start afresh in an output_dir that holds an earlier run: once this run's checks have passed "
        "(config, rewards, data, model), the earlier run's config.yaml, metrics.jsonl, rollouts.jsonl, "
        "reward_errors.jsonl, *.earlier-K.jsonl, curves.png, tb/ and checkpoints/ are deleted (other "
        "files, such as the generated shapes/ data, stay). Without it, or --resume, such a folder is refused",
        resume_safe=True,
    )
    force_resume: bool = _f(
        False,
        "resume although the config differs from the checkpoint's in a field that changes training "
        "(model, data, group_size, seed, ...), or from an older checkpoint whose newer siblings in "
        "output_dir are then deleted",
        resume_safe=True,
    )
    max_bad_steps: int = _f(
        5,
        "stop the run after this many consecutive steps with a skipped (NaN/inf loss or gradient) "
        "optimizer update; 0 = never stop",
        resume_safe=True,
    )
    tensorboard: bool = _f(True, "write TensorBoard logs when tensorboard is installed", resume_safe=True)

    def __post_init__(self):
        normalise(self)
        self.validate()

    @property
    def rollouts(self) -> int:
        """N = B·G, rollouts per step."""
        return self.prompts_per_step * self.group_size

    def validate(self) -> None:
        """Raise ConfigError listing every problem, each with what to change. It changes nothing and
        writes nothing (a preset given as a .yaml path is read to check it)."""
        errors = [problem] if (problem := _rollouts_problem(self)) else []
        for name in _AT_LEAST_ONE:
            if getattr(self, name) is not None and getattr(self, name) < 1:  # max_steps none: from epochs
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        errors += _data_errors(self)
        for name in _NON_NEGATIVE:
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                errors.append(f"{name} must be >= 0 (0 turns it off), got {value}")
        if self.keep_best and not self.eval_every:
            errors.append("keep_best needs evaluations to compare: set --eval-every N (or drop --keep-best)")
        for name, valid in (("dtype", DTYPES), ("lr_schedule", SCHEDULES)):
            if getattr(self, name) not in valid:
                errors.append(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        if self.group_size < 2:
            errors.append(
                f"group_size {self.group_size} leaves one rollout per prompt, so every GRPO "
                "advantage is 0: use --group-size 2 or more"
            )
        n = self.rollouts
        mini = self.mini_batch_size if self.mini_batch_size is not None else n
        if min(n, mini, self.micro_batch_size) < 1:
            if mini < 1:
                errors.append(
                    f"mini_batch_size must be >= 1 (or none = all rollouts of the step), got {mini}"
                )
        elif n % mini:
            errors.append(
                f"batch of {n} rollouts ({self.prompts_per_step} prompts x group size "
                f"{self.group_size}) is not divisible by mini_batch_size {mini}: use one of "
                f"{_divisors(n)}"
            )
        elif mini % self.micro_batch_size:
            errors.append(
                f"mini-batch of {mini} rollouts is not divisible by micro_batch_size "
                f"{self.micro_batch_size}: use one of {_divisors(mini)}"
            )
        for name in ("clip_low", "clip_high"):
            if not 0 < getattr(self, name) < 1:
                errors.append(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.dual_clip is not None and not (self.dual_clip > 1 and math.isfinite(self.dual_clip)):
            errors.append(f"dual_clip must be > 1 (or none to turn it off), got {self.dual_clip}")
        if self.papo_clip is not None and not (self.papo_clip > 0 and math.isfinite(self.papo_clip)):
            errors.append(f"papo_clip must be > 0 (or none to turn it off), got {self.papo_clip}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            errors.append(
                f"temperature must be a number > 0 (logits are divided by it), got {self.temperature}"
            )
        if not (self.dist_timeout > 0 and math.isfinite(self.dist_timeout)):
            errors.append(f"dist_timeout must be a number of seconds > 0, got {self.dist_timeout}")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p must be in (0, 1], got {self.top_p}")
        if (rows := self.generation_batch_size) is not None and rows < 1:
            errors.append(f"generation_batch_size must be >= 1 (or none = sized from memory), got {rows}")
        if self.top_k < 0:
            errors.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            errors.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        if self.pure_bf16 and self.dtype == "float32":
            errors.append("pure_bf16 needs bfloat16 compute: set --dtype bfloat16 (or drop --pure-bf16)")
        if not (self.cpl_tau > 0 and math.isfinite(self.cpl_tau)):
            errors.append(f"cpl_tau must be > 0 (CPL divides by it), got {self.cpl_tau}")
        if not 0 < self.top_percent <= 1:
            errors.append(f"top_percent must be in (0, 1], got {self.top_percent}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            errors.append(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.rewards:
            errors.append("rewards is empty: give at least one reward function (e.g. --rewards accuracy)")
        if len(self.reward_weights) != len(self.rewards):
            errors.append(
                f"{len(self.rewards)} reward functions ({', '.join(self.rewards)}) but "
                f"{len(self.reward_weights)} reward_weights: give one weight per function"
            )
        errors += _run_errors(self)
        if self.lora_r and not self.lora_targets:
            errors.append("lora_r > 0 needs at least one module name in lora_targets")
        errors += _registry_errors(self)
        if errors:  # one line, as every refusal of the commands (docs/reliability.md)
            raise ConfigError("invalid config: " + "; ".join(errors))

    # --- files
    def to_dict(self) -> dict:
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        """A config from a mapping of field -> value, checked as flags are (ConfigError names `source`)."""
        parser = build_parser()
        parser.set_defaults(**parser.file_values(values, source))
        return parser.parse_args_into_dataclasses([], look_for_args_file=False)[0]

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(load_yaml(path), source=str(path))


def resume_safe_fields() -> frozenset[str]:
    """The fields marked ``resume_safe``: a resume may change them without changing what is trained
    (a longer run, other logging, another compute layout). max_steps is one although it stretches a
    linear/cosine schedule: the loop warns when it does."""
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume_safe"))


def _run_errors(cfg: TrainConfig) -> list[str]:
    """The checks of the seed, the reward weights, the device and the run directory's fields."""
    errors = []
    if cfg.seed < 0:
        errors.append(f"seed must be >= 0, got {cfg.seed}")
    weights = cfg.reward_weights
    if not all(math.isfinite(w) for w in weights):
        errors.append(f"reward_weights must be finite numbers, got {list(weights)}")
    elif weights and not any(weights):
        errors.append("reward_weights are all 0, so every reward and advantage is 0: give a weight != 0")
    if cfg.device not in DEVICES:
        errors.append(
            f"unknown device {cfg.device!r}; valid: {', '.join(DEVICES)} (CUDA_VISIBLE_DEVICES and the "
            "launcher choose the GPUs)"
        )
    if not str(cfg.output_dir).strip():
        errors.append("output_dir is empty: name a run directory, or leave it out for runs/<algo>")
    if cfg.overwrite and cfg.resume:
        errors.append(
            "overwrite deletes the run that resume would continue: give --resume or --overwrite, not both"
        )
    return errors


def _data_errors(cfg: TrainConfig) -> list[str]:
    """The checks of the data fields: the column mappings, epochs and the preprocessing's numbers."""
    errors = []
    for name in ("data_columns", "eval_data_columns"):
        try:
            parse_columns(getattr(cfg, name))
        except ValueError as e:
            errors.append(f"{name}: {e}")
    if cfg.epochs is not None and not (cfg.epochs > 0 and math.isfinite(cfg.epochs)):
        errors.append(f"epochs must be > 0 (or none: max_steps decides), got {cfg.epochs}")
    if cfg.min_image_side < 0:
        errors.append(f"min_image_side must be >= 0 (0 turns it off), got {cfg.min_image_side}")
    for name in ("max_prompt_length", "min_pixels", "max_pixels"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            errors.append(f"{name} must be >= 1 (or none), got {getattr(cfg, name)}")
    if cfg.min_pixels and cfg.max_pixels and cfg.min_pixels > cfg.max_pixels:
        errors.append(f"min_pixels {cfg.min_pixels} is over max_pixels {cfg.max_pixels}")
    return errors


def resolve_max_steps(cfg: TrainConfig, num_samples: int) -> bool:
    """Set max_steps from epochs once the data is known: the steps that draw epochs x num_samples
    prompts, B a step, rounded up. True when it did; False (nothing changed) when max_steps is set."""
    if cfg.max_steps is not None:
        return False
    cfg.max_steps = max(1, math.ceil(round(cfg.epochs * num_samples, 6) / cfg.prompts_per_step))
    return True


def _registry_errors(cfg: TrainConfig) -> list[str]:
    """Names that must be in a registry; the registries' own errors list the valid names."""
    checks = [
        ("algo", get_perception_term),
        ("kl_estimator", DIVERGENCES.get),
        ("policy_loss", POLICY_LOSSES.get),
        ("loss_agg", AGGREGATIONS.get),
        ("cpl_divergence", lambda name: name == "full" or DIVERGENCES.get(name)),
        ("cpl_gate", GATES.get),
        ("selector", SELECTORS.get),
        ("preset", get_preset),
        ("papo_preset", get_preset),
    ]
    errors = []
    for name, get in checks:
        try:
            get(getattr(cfg, name))
        except ValueError as e:
            errors.append(f"{name}: {e}" + (", full" if name == "cpl_divergence" else ""))
    names = [reward_name(spec) for spec in cfg.rewards]
    for spec, name in zip(cfg.rewards, names):
        if spec == name:  # a registered name; a user function (module:function) is imported by the run
            try:
                get_reward(spec)
            except ValueError as e:
                errors.append(f"rewards: {e}")
    if len(set(names)) != len(names):
        errors.append(f"reward names must be distinct, got {names}")
    return errors


def normalise(cfg: TrainConfig) -> None:
    """The one step that changes a config's values, run as it is built: betas as a tuple, and N
    (rollouts_per_step) turned into B (prompts_per_step), the one number the rest of the code reads."""
    if isinstance(cfg.betas, list):
        cfg.betas = tuple(cfg.betas)
    if cfg.max_steps is None and cfg.epochs is None:
        cfg.max_steps = DEFAULT_MAX_STEPS
    if cfg.output_dir is None:  # each algorithm its own default folder, so that runs never collide
        cfg.output_dir = f"runs/{cfg.algo}"
    if cfg.rollouts_per_step is not None:
        if problem := _rollouts_problem(cfg):
            raise ConfigError(problem)
        cfg.prompts_per_step = cfg.rollouts_per_step // max(cfg.group_size, 1)
        cfg.rollouts_per_step = None


def _rollouts_problem(cfg: TrainConfig) -> str | None:
    n, g = cfg.rollouts_per_step, cfg.group_size
    if n is not None and g >= 1 and (n < g or n % g):
        return (
            f"batch of {n} rollouts is not divisible by group size {g}: set "
            f"--rollouts-per-step to a multiple of {g} (e.g. {max(1, n // g) * g})"
        )
    return None


def check_launch(cfg: TrainConfig, world: int = 1, sharded: bool = False) -> None:
    """What cppo-train's loop needs beyond a valid config, checked before any model loads: the
    process count and FSDP (``sharded``) of this launch, a CUDA device that this torch does not see, and
    the options of cppo.loss / cppo.detect that the loop does not wire in (they need the views' hidden
    states, which the loop does not keep)."""
    errors = []
    if cfg.prompts_per_step % world:
        errors.append(
            f"{cfg.prompts_per_step} prompts per step cannot be shared by {world} processes: set "
            f"--prompts-per-step to a multiple of {world}"
        )
    if sharded and cfg.lora_r:
        errors.append("LoRA is not supported with FSDP: set --lora-r 0, or launch without the FSDP config")
    if cfg.cpl_divergence == "full":
        errors.append(
            "cpl_divergence full is offered by cppo.loss.contrastive_perception_loss_full for other "
            "trainers; cppo-train supports k1|k2|k3: set --cpl-divergence k3"
        )
    if cfg.selector == "kl_shift":
        errors.append(
            "selector kl_shift is offered by cppo-detect; cppo-train ranks by entropy shift: set "
            "--selector relative (or raw, entropy)"
        )
    if cfg.device == "cuda" and not torch.cuda.is_available():  # never train on the CPU instead, silently
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        errors.append(
            f"device cuda: this torch ({torch.__version__}, {build}) sees no CUDA device: use --device cpu "
            "(or auto), or run where a GPU is visible"
        )
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError("cannot train this config: " + "; ".join(errors))


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
ALIASES = {"learning_rate": "lr"}  # config keys TRL / transformers users write -> ours
_HINTS = typing.get_type_hints(TrainConfig)
_OPTIONAL = {name for name, hint in _HINTS.items() if type(None) in typing.get_args(hint)}
# add_argument's options; a field's metadata also holds cppo's own keys (resume_safe), which argparse refuses
_ARGPARSE_OPTIONS = set("action nargs const default type choices required help metavar dest".split())


class ConfigParser(HfArgumentParser):
    """transformers' HfArgumentParser over TrainConfig: it makes the flags from the fields (``--group-size``
    and ``--group_size``, ``--x [BOOL]`` for booleans, several values for lists, the help from each
    field's metadata). On top, through add_argument: ``none`` for optional fields, the same value
    check for a flag and a YAML value, ``--no-x`` for every boolean, and ConfigError instead of an exit."""

    def __init__(self, prog: str = "cppo-train"):
        self.converters: dict[str, tuple] = {}  # field -> (its value check, its nargs)
        self.flags: list[str] = []  # every long flag, for "did you mean"
        declared = {name: f.type for name, f in FIELDS.items()}
        super().__init__(
            TrainConfig,
            prog=prog,
            allow_abbrev=False,  # "--lr" must never be read as a prefix of another flag
            exit_on_error=False,
            description="RL finetuning of a vision-language model with GRPO, CPPO (Contrastive Perception "
            "Policy Optimization, arXiv 2601.00501) or PAPO. Precedence: defaults < --config < flags. A "
            "run directory that holds an earlier run needs --resume auto (continue it) or --overwrite "
            "(delete it first; see --overwrite).",
        )
        for name, f in FIELDS.items():  # HfArgumentParser resolves field.type in place; keep it as declared
            f.type = declared[name]
        self.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys, flat as the flags")
        self.add_argument(
            "--print-config",
            action="store_true",
            help="validate, print the resolved config as YAML and exit without training",
        )
        self.add_argument(
            "--dry-run",
            action="store_true",
            help="validate, print the resolved config, the data's steps per epoch, the updates per step "
            "and the memory estimate per GPU (cppo.rl.plan), and exit without loading a model",
        )
        self.add_argument(
            "--dry-run-gpus",
            type=int,
            metavar="N",
            default=None,
            help="processes (GPUs) for --dry-run's estimate; default: the launch's (WORLD_SIZE), else 1",
        )

    def add_argument(self, *flags, **kw):
        kw = {k: v for k, v in kw.items() if k in _ARGPARSE_OPTIONS}
        name = kw.get("dest", flags[0].lstrip("-"))
        self.flags += [f.replace("_", "-") for f in flags if f.startswith("--")]
        if name in self.converters and kw.get("action") == "store_false":  # the --no-x of a boolean
            kw.update(default=argparse.SUPPRESS, help=f"the opposite of --{name.replace('_', '-')}")
        if name not in FIELDS or name in self.converters:
            return super().add_argument(*flags, **kw)
        scalar, nargs = kw["type"], kw.get("nargs")
        if typing.get_origin(scalar) is tuple:  # HfArgumentParser passes tuple[float, float] on as a type
            scalar, nargs = typing.get_args(scalar)[0], len(typing.get_args(scalar))
        scalar = bool if scalar is string_to_bool else scalar
        if scalar in (bool, int, float, str):
            optional = "|none" if name in _OPTIONAL else "|auto" if _auto_switch(name) else ""
            listed = nargs not in (None, "?")
            kw.update(
                type=_converter(name, scalar, listed), nargs=nargs, metavar=scalar.__name__.upper() + optional
            )
        self.converters[name] = (kw["type"], nargs)
        action = super().add_argument(*flags, **kw)
        # HfArgumentParser adds --no-x when x defaults to True; here when False or auto
        if scalar is bool and (FIELDS[name].default is False or _auto_switch(name)):
            no = f"--no-{name.replace('_', '-')}"
            self.add_argument(f"--no_{name}", no, action="store_false", dest=name)
        return action

    def error(self, message: str):
        raise ConfigError(f"flags: {message}")

    def read_flags(self, argv: list[str]) -> argparse.Namespace:
        """The flags alone; ConfigError for a bad value or an unknown flag (with the closest known one)."""
        try:
            namespace, rest = self.parse_known_args(argv)
        except ArgumentError as e:
            name = (e.argument_name or "").split("/")[0].lstrip("-")
            raise ConfigError(" ".join(filter(None, ("flags:", name, e.message)))) from None
        if rest:
            raise _unknown_flag(rest, self.flags)
        return namespace

    def file_values(self, values: dict, source: str) -> dict:
        """A YAML file's (or a mapping's) values, checked as the flags are, ready for set_defaults;
        ConfigError naming `source` (with the key's line when `values` is load_yaml's) and the key."""
        out = {}
        for key, value in values.items():
            where = f"{source}:{values.lines[key]}" if key in getattr(values, "lines", {}) else source
            key = ALIASES.get(key, key)
            if key not in self.converters:
                raise _unknown_key(key, where)
            convert, nargs = self.converters[key]
            try:
                if nargs in (None, "?"):
                    out[key] = convert(value)
                    continue
                items = list(value) if isinstance(value, (list, tuple)) else [value]
                if isinstance(nargs, int) and len(items) != nargs:
                    raise ArgumentTypeError(f"expects {nargs} values, got {value!r}")
                out[key] = [convert(v) for v in items]
            except ArgumentTypeError as e:
                raise ConfigError(f"{where}: {key} {e}") from None
        return out


def _auto_switch(name: str) -> bool:
    """A boolean field whose default is "auto" (decided by the run, e.g. gradient_checkpointing):
    it takes true / false / auto, and has --x and --no-x like any boolean."""
    return FIELDS[name].default == "auto" and bool in typing.get_args(_HINTS[name])


def _converter(name: str, scalar: type, listed: bool = False):
    """The argparse type of a field, applied to YAML values too: ints are floats, '1e-6' strings are
    numbers (YAML 1.1 reads 1e-6 without a dot as a string), none/null is None where the field allows
    it, auto where the field is an auto switch. A text field takes a YAML number too (``output_dir:
    2024``), but never a boolean, and a list of names (``listed``: rewards, lora_targets) only text
    (``rewards: 5`` is a mistake, not the reward "5")."""

    def convert(value):
        if _auto_switch(name) and str(value).lower() == "auto":
            return "auto"
        if name in _OPTIONAL and (value is None or str(value).lower() in ("none", "null")):
            return None
        if value is None:
            raise ArgumentTypeError("cannot be none")
        with suppress(TypeError, ValueError, ArgumentTypeError):
            if scalar is bool and isinstance(value, (bool, str)):
                return string_to_bool(value)
            if scalar is int and not isinstance(value, (bool, float)):
                return int(value)
            if scalar is int and isinstance(value, float) and value.is_integer():
                return int(value)
            if scalar is float and not isinstance(value, bool):
                return float(value)
            if scalar is str and (isinstance(value, str) or _number(value) and not listed):
                return str(value)
        kind = f"a list of {scalar.__name__}" if listed else scalar.__name__
        raise ArgumentTypeError(f"expects {kind}, got {value!r}")

    return convert


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _unknown_key(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key.replace("-", "_"), FIELDS, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else "; run cppo-train --help for the list"
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _unknown_flag(rest: list[str], flags: list[str]) -> ConfigError:
    arg = next((a for a in rest if a.startswith("-")), rest[0])
    if not arg.startswith("-"):
        return ConfigError(f"flags: unexpected value {arg!r} (a flag takes the form --name VALUE)")
    close = difflib.get_close_matches(arg.split("=")[0].replace("_", "-"), flags, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else "; run cppo-train --help for the list"
    return ConfigError(f"flags: unknown flag {arg!r}{hint}")


class ConfigValues(dict):
    """A config file's field -> value, with ``lines``: field -> the line it is set on (for messages)."""

    lines: dict[str, int]


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


def _key(key) -> str:
    """A config key as the fields name it: ``-`` read as ``_``, TRL's names as ours (ALIASES)."""
    key = str(key).replace("-", "_")
    return ALIASES.get(key, key)


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    """SafeLoader's mapping, refusing a key given twice (PyYAML silently keeps the last; YAML 1.2 says
    keys are unique). Keys are compared as config keys, so ``group-size`` repeats ``group_size``."""
    first: dict[str, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key, line = _key(loader.construct_object(key_node, deep=True)), key_node.start_mark.line + 1
        if key in first:
            raise _DuplicateKey(key, line, first[key])
        first[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(path: str | Path) -> ConfigValues:
    """A flat mapping of field -> value (``-`` in keys read as ``_``), or ConfigError naming
    ``file:line``: a syntax error, a key given twice (refused: which one was meant is a guess, and
    PyYAML would keep the last without a word), a file that is not a mapping or not UTF-8 text."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a regular file: give a YAML file to --config")
    try:
        loader = _UniqueKeyLoader(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config file ({e}); it must be UTF-8 text") from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except _DuplicateKey as e:
        raise ConfigError(
            f"{path}:{e.line}: duplicate key {e.key!r} (also on line {e.first}): keep one of them"
        ) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    values = ConfigValues((_key(k), v) for k, v in data.items())
    values.lines = {_key(k.value): k.start_mark.line + 1 for k, _ in node.value} if node is not None else {}
    return values


def build_parser(prog: str = "cppo-train") -> ConfigParser:
    """One flag per field (``--help`` lists them with their help and default), plus --config and
    --print-config."""
    return ConfigParser(prog)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then ``--config FILE.yaml``, then flags -> a validated TrainConfig (ConfigError if not)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    path = parser.read_flags(argv).config  # a bad or unknown flag is reported before the file is read
    if path:
        parser.set_defaults(**parser.file_values(load_yaml(path), str(path)))
    return parser.parse_args_into_dataclasses(argv, look_for_args_file=False)[0]
