"""The trainer's configuration: one documented dataclass, a YAML file for defaults, flags on top.

Letters: B prompts per step, G rollouts per prompt (the group), N = B·G rollouts per step.

Precedence, lowest first: the dataclass defaults, ``--config FILE.yaml``, then flags. Every field is
a flag (``group_size`` -> ``--group-size 8``; booleans as ``--x/--no-x``; lists take several values;
``none`` sets an optional field to None). ``parse_args(argv)`` returns a validated ``TrainConfig``;
``TrainConfig.save(path)`` writes the resolved config a run can be restarted from.

Defaults are sized for the no-argument demo (the bundled tiny model on the shapes task, a few
minutes on CPU); each help text gives the paper's value where it differs (docs/method.md §4: 512 prompts
x G=5, 8 updates per step, lr 1e-6, 4096 new tokens). Batch sizes below the step are counted in
rollouts (as TRL's ``per_device_train_batch_size``), not prompts (as verl's mini-batch), so one
number means the same thing for the mini- and the micro-batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ALGOS = ("grpo", "cppo", "papo")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SCHEDULES = ("constant", "linear", "cosine")
_AT_LEAST_ONE = "max_steps prompts_per_step group_size micro_batch_size ppo_epochs logits_chunk_size \
max_new_tokens eval_samples".split()
_NON_NEGATIVE = "lr weight_decay grad_clip beta cpl_lambda papo_gamma papo_entropy_coef warmup_steps \
save_every keep_last eval_every log_rollouts lora_r lora_dropout max_bad_steps".split()


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
    algo: str = _f(
        "cppo",
        f"one of {'|'.join(ALGOS)}: the same loop; cppo adds the views and CPL, "
        "papo the masked-image KL term",
    )
    output_dir: str = _f(
        "runs/cppo", "run directory: config.yaml, metrics.jsonl, checkpoints, rollouts", resume_safe=True
    )
    seed: int = _f(0, "seed of the data order, the views, the sampling and the initialisation of LoRA")
    # --- batch shape
    max_steps: int = _f(60, "training steps (one rollout batch each)", resume_safe=True)
    prompts_per_step: int = _f(8, "B, prompts per step (paper: 512)")
    rollouts_per_step: int | None = _f(
        None,
        "N, rollouts per step, instead of prompts_per_step (as TRL's "
        "generation_batch_size); must be divisible by group_size",
    )
    group_size: int = _f(5, "G, rollouts per prompt (paper: 5)")
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
        5e-5, "AdamW learning rate (paper: 1e-6 on 3B/7B; 5e-5 is the stable rate for the tiny demo model)"
    )
    weight_decay: float = _f(0.01, "AdamW weight decay")
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    lr_schedule: str = _f("constant", f"learning-rate schedule after warmup, one of {'|'.join(SCHEDULES)}")
    warmup_steps: int = _f(
        10,
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
    max_new_tokens: int = _f(96, "max response tokens (paper: 4096)")
    seed_per_prompt: bool = _f(
        False,
        "sample each prompt's group from its own seed (one generate call per prompt): rollouts then do "
        "not depend on the rest of the batch or on the number of processes",
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
    # --- compute
    logits_chunk_size: int = _f(
        256, "response positions per chunk of the output head (entropy, log-probs)", resume_safe=True
    )
    dtype: str = _f(
        "auto", f"parameter dtype, one of {'|'.join(DTYPES)}; auto = bfloat16 on CUDA, float32 else"
    )
    device: str = _f(
        "auto", "auto = what accelerate picks (CUDA when present), or cpu / cuda", resume_safe=True
    )
    gradient_checkpointing: bool = _f(
        False, "recompute activations in backward (paper: on)", resume_safe=True
    )
    freeze_vision: bool = _f(False, "freeze the vision tower and its merger; train only the language model")
    lora_r: int = _f(0, "LoRA rank; 0 = full finetuning (LoRA needs peft installed)")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout")
    lora_targets: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "module names LoRA wraps")
    # --- run
    save_every: int = _f(
        0, "checkpoint every N steps (and at the end); 0 = only at the end", resume_safe=True
    )
    keep_last: int = _f(2, "checkpoints kept; older ones are deleted; 0 = keep all", resume_safe=True)
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
        self.validate()

    @property
    def rollouts(self) -> int:
        """N = B·G, rollouts per step."""
        return self.prompts_per_step * self.group_size

    def validate(self) -> None:
        """Raise ConfigError listing every problem, each with what to change."""
        if self.rollouts_per_step is not None:
            n, g = self.rollouts_per_step, self.group_size
            if g >= 1 and (n < g or n % g):
                raise ConfigError(
                    f"batch of {n} rollouts is not divisible by group size {g}: set "
                    f"--rollouts-per-step to a multiple of {g} (e.g. {max(1, n // g) * g})"
                )
            self.prompts_per_step, self.rollouts_per_step = n // max(g, 1), None
        errors = []
        for name in _AT_LEAST_ONE:
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in _NON_NEGATIVE:
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                errors.append(f"{name} must be >= 0 (0 turns it off), got {value}")
        if self.algo not in ALGOS:
            errors.append(f"unknown algo {self.algo!r}; valid: {', '.join(ALGOS)}")
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
        if self.dual_clip is not None and self.dual_clip <= 1:
            errors.append(f"dual_clip must be > 1 (or none to turn it off), got {self.dual_clip}")
        if self.papo_clip is not None and not self.papo_clip > 0:
            errors.append(f"papo_clip must be > 0 (or none to turn it off), got {self.papo_clip}")
        if not self.temperature > 0:
            errors.append(f"temperature must be > 0 (logits are divided by it), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.cpl_tau > 0:
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
        if self.lora_r and not self.lora_targets:
            errors.append("lora_r > 0 needs at least one module name in lora_targets")
        errors += _registry_errors(self)
        if errors:
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))

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
        return cls(**_coerce_all(values, source))

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(load_yaml(path), source=str(path))


def resume_safe_fields() -> frozenset[str]:
    """The fields marked ``resume_safe``: a resume may change them without changing what is trained
    (a longer run, other logging, another compute layout). max_steps is one although it stretches a
    linear/cosine schedule: the loop warns when it does."""
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume_safe"))


def _registry_errors(cfg: TrainConfig) -> list[str]:
    """Names that must be in a registry; the registries' own errors list the valid names."""
    from cppo.loss import AGGREGATIONS, DIVERGENCES, GATES, POLICY_LOSSES, SELECTORS
    from cppo.perturb import get_preset

    checks = [
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
    return errors


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _kind(name: str) -> tuple[type, bool, bool]:
    """(scalar type, optional?, is a sequence?) of a field, from its annotation."""
    hint, optional = _HINTS[name], False
    if isinstance(hint, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint, optional = args[0], True
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        return typing.get_args(hint)[0], optional, True
    return hint, optional, False


def _coerce(name: str, value, source: str):
    """Check one value against its field's type; ints are floats, '1e-6' strings are numbers (YAML 1.1
    reads 1e-6 without a dot as a string)."""
    scalar, optional, seq = _kind(name)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{source}: {name} cannot be none")
    if seq:
        values = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce_scalar(name, scalar, v, source) for v in values]
    return _coerce_scalar(name, scalar, value, source)


def _coerce_scalar(name: str, scalar: type, value, source: str):
    bad = ConfigError(f"{source}: {name} expects {scalar.__name__}, got {value!r}")
    if scalar is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise bad
    if isinstance(value, bool):
        raise bad
    try:
        if scalar is int:
            if isinstance(value, float) and not value.is_integer():
                raise bad
            return int(value)
        if scalar is float:
            return float(value)
    except (TypeError, ValueError):
        raise bad from None
    if scalar is str and not isinstance(value, (str, int, float)):
        raise bad
    return str(value)


def _unknown_key(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key.replace("-", "_"), FIELDS, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else "; run cppo-train --help for the list"
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _coerce_all(values: dict, source: str) -> dict:
    out = {}
    for key, value in values.items():
        if key not in FIELDS:
            raise _unknown_key(key, source)
        out[key] = _coerce(key, value, source)
        if typing.get_origin(_HINTS[key]) is tuple:
            size = len(typing.get_args(_HINTS[key]))
            if len(out[key]) != size:
                raise ConfigError(f"{source}: {key} expects {size} values, got {value!r}")
            out[key] = tuple(out[key])
    return out


def load_yaml(path: str | Path) -> dict:
    """A flat mapping of field -> value; ``-`` in keys is read as ``_``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_parser(prog: str = "cppo-train") -> argparse.ArgumentParser:
    """One flag per field; defaults are SUPPRESSed so only the flags given override the YAML."""
    parser = argparse.ArgumentParser(
        prog=prog,
        allow_abbrev=False,  # "--lr" must never be read as a prefix of another flag
        description="RL finetuning of a vision-language model with GRPO, CPPO (Contrastive Perception "
        "Policy Optimization, arXiv 2601.00501) or PAPO. Precedence: defaults < --config < flags.",
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of config keys (flat, as the flags)")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="validate, print the resolved config as YAML and exit without training",
    )
    for name, f in FIELDS.items():
        scalar, optional, seq = _kind(name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = dict(dest=name, default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {default})")
        flag = "--" + name.replace("_", "-")
        if scalar is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif seq:
            n = len(default) if typing.get_origin(_HINTS[name]) is tuple else "+"
            parser.add_argument(flag, nargs=n, metavar=name.upper(), **kw)
        else:
            parser.add_argument(flag, metavar=scalar.__name__.upper() + ("|none" if optional else ""), **kw)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then ``--config FILE.yaml``, then flags -> a validated TrainConfig (ConfigError if not)."""
    args = vars(build_parser().parse_args(argv))
    args.pop("print_config")
    path = args.pop("config")
    values = _coerce_all(load_yaml(path), str(path)) if path else {}
    values.update(_coerce_all(args, "flags"))
    return TrainConfig(**values)
