"""`TrainConfig`: the trainer's settings, each documented, and what a valid config is.

B prompts per step, G rollouts per prompt (the group), N = B·G rollouts per step; batch sizes below
the step count rollouts (as TRL's), not prompts (as verl's). Defaults suit the no-argument demo (tiny
model, shapes task, minutes on CPU); help texts give the paper's value where it differs. A field's
metadata: ``help``, and optionally ``aliases`` (flag names), ``check`` (a rule of cppo.rl.bounds) and
``resume_safe``; fixed choices are ``Literal`` types. The CPL's fields come from cppo.loss.CPLSettings.
Flags and YAML files: cppo.rl.flags; checks of the launch and steps from epochs: cppo.rl.launch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from cppo.loss import AGGREGATIONS, DIVERGENCES, POLICY_LOSSES, CPLSettings
from cppo.perturb import get_preset
from cppo.rl.bounds import Bound, Lookup, above, at_least, batch_problems, field_problems
from cppo.rl.perception import get_perception_term
from cppo.rl.rewards import get_reward, reward_name
from cppo.rl.sources import parse_columns
from cppo.rl.trackers import tracker_name

ALGOS = ("cppo", "grpo", "papo")  # the built-in perception terms (cppo.rl.perception)
DEFAULT_MAX_STEPS = 40  # the demo's run length, when neither max_steps nor epochs is given
POSITIVE, OFF_AT_0 = at_least(1), at_least(0, "0 turns it off")
OPEN_0_1 = Bound(0, 1, low_open=True, high_open=True)  # the PPO clips


class ConfigError(ValueError):
    """A configuration the trainer cannot run; the message says what to change."""


def _f(default, help: str, **metadata):
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def _safe(default, help: str, **metadata):  # a field a resume may change (resume_safe_fields)
    return _f(default, help, resume_safe=True, **metadata)


def _reward(spec: str):  # a registered name; a user function (module:function) is imported by the run
    return spec != reward_name(spec) or get_reward(spec)


@dataclass
class TrainConfig(CPLSettings):
    # --- what to train on
    model: str | None = _f(None, "model directory or hub id; None = the bundled tiny demo model")
    data: str | None = _f(
        None,
        "training data: a JSONL file, a folder with data.jsonl or train/data.jsonl, "
        "a Hugging Face save_to_disk folder or a .parquet file; None = the shapes task, "
        "generated into <output_dir>/shapes",
    )
    eval_data: str | None = _safe(
        None,
        "held-out data for eval_every (same formats); None = the val split next "
        "to the training data when there is one",
    )
    data_strict: bool = _safe(
        False,
        "treat unusable samples (missing answer or image, corrupt image) as errors "
        "instead of skipping them with a count",
    )
    data_columns: str | None = _f(
        None,
        "sample field=column pairs for data whose columns have other names, e.g. "
        "image=picture,question=prompt (fields: image, question, answer, question_type); none = the "
        "usual names: images/image, question/problem, answer/ground_truth/solution, question_type/category",
        check=Lookup(parse_columns),
    )
    eval_data_columns: str | None = _safe(
        None, "the same for eval_data; none = data_columns", check=Lookup(parse_columns)
    )
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
        check=OFF_AT_0,
    )
    max_prompt_length: int | None = _f(
        512,
        "leave out prompts over this many tokens (chat template, question, instruction and image tokens), "
        "counted and named; an error under --data-strict (paper: 512; none = keep every prompt)",
        check=at_least(1, "or none"),
    )
    min_pixels: int | None = _f(
        None,
        "the processor resizes every image to at least this many pixels; none = the model processor's "
        "own (Qwen2.5-VL-Instruct: 3136, which the paper keeps)",
        check=at_least(1, "or none"),
    )
    max_pixels: int | None = _f(
        None,
        "the processor resizes every image to at most this many pixels; none = the model processor's "
        "own (Qwen2.5-VL-Instruct: 12845056, which the paper keeps)",
        check=at_least(1, "or none"),
    )
    algo: str = _f(
        "cppo",
        f"one of {'|'.join(ALGOS)}: the same loop; cppo adds the views and CPL, "
        "papo the masked-image KL term",
        check=Lookup(get_perception_term),
    )
    output_dir: str | None = _safe(
        None,
        "run directory: config.yaml, metrics.jsonl, checkpoints, rollouts; none = runs/<algo> (runs/cppo, "
        "runs/grpo, runs/papo). A fresh run into one that holds an earlier run is refused unless --resume "
        "or --overwrite is given",
    )
    seed: int = _f(
        0, "seed of the data order, the views, the sampling and the initialisation of LoRA", check=at_least(0)
    )
    # --- batch shape
    max_steps: int | None = _safe(
        None,
        "training steps (one rollout batch each); none = from epochs when it is set, else "
        f"{DEFAULT_MAX_STEPS}",
        check=POSITIVE,
    )
    epochs: float | None = _safe(
        None,
        "passes over the training data, used when max_steps is none: max_steps = ceil(epochs x samples / B), "
        "with drop_last ceil(epochs x floor(samples / B)) (paper: 2; cppo-train --dry-run prints it)",
        check=above(0, "or none: max_steps decides"),
    )
    drop_last: bool = _f(
        False, "end each epoch at its last full step, leaving the rest out (verl's way; the paper configs)"
    )
    prompts_per_step: int = _f(16, "B, prompts per step (paper: 512)", check=POSITIVE)
    rollouts_per_step: int | None = _f(
        None,
        "N, rollouts per step, instead of prompts_per_step (as TRL's "
        "generation_batch_size); must be divisible by group_size",
    )
    group_size: int = _f(8, "G, rollouts per prompt (paper: 5)", check=POSITIVE)
    mini_batch_size: int | None = _f(
        None,
        "rollouts per optimizer update; None = all N of the step (one "
        "update per epoch). Paper: 320 (64 prompts x 5), 8 updates per step",
        check=at_least(1, "or none = all rollouts of the step"),
    )
    micro_batch_size: int = _safe(
        4,
        "rollouts per forward/backward pass; gradients accumulate to a mini-batch",
        check=POSITIVE,
    )
    ppo_epochs: int = _f(
        1, "passes over the step's rollouts; updates per step = ppo_epochs x N / mini_batch", check=POSITIVE
    )
    # --- optimiser
    lr: float = _f(
        1e-4,
        "AdamW learning rate (paper: 1e-6 on 3B/7B; 1e-4 is the demo model's, measured in docs/results.md); "
        "--learning-rate and the YAML key learning_rate (TRL's name) mean the same",
        aliases=["--learning-rate", "--learning_rate"],
        check=OFF_AT_0,
    )
    weight_decay: float = _f(0.01, "AdamW weight decay", check=OFF_AT_0)
    betas: tuple[float, float] = _f((0.9, 0.999), "AdamW betas")
    lr_schedule: Literal["constant", "linear", "cosine"] = _f(
        "constant", "learning-rate schedule after warmup: constant|linear|cosine"
    )
    warmup_steps: int = _f(
        3,
        "optimizer updates of linear warmup from 0 (Adam's first full-size steps can collapse a policy)",
        check=OFF_AT_0,
    )
    grad_clip: float = _f(1.0, "max global gradient norm; 0 = no clipping", check=OFF_AT_0)
    # --- GRPO
    beta: float = _f(
        0.01, "weight of the KL to a frozen reference model; 0 = no reference model is loaded", check=OFF_AT_0
    )
    kl_estimator: str = _f(
        "k3",
        "estimator of the KL to the reference, a registered divergence: k1|k2|k3",
        check=Lookup(DIVERGENCES.get),
    )
    policy_loss: str = _f(
        "vanilla", "a registered policy loss: vanilla (PPO-clip) | reinforce", check=Lookup(POLICY_LOSSES.get)
    )
    clip_low: float = _f(0.2, "PPO ratio clip below 1 (ratio >= 1 - clip_low)", check=OPEN_0_1)
    clip_high: float = _f(
        0.2, "PPO ratio clip above 1 (ratio <= 1 + clip_high; DAPO uses 0.28)", check=OPEN_0_1
    )
    dual_clip: float | None = _f(
        3.0,
        "dual-clip bound c > 1 on negative advantages; None = off",
        check=above(1, "or none to turn it off"),
    )
    loss_agg: str = _f(
        "token-mean",
        "aggregation of the per-token losses, a registered aggregation: "
        "token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm",
        check=Lookup(AGGREGATIONS.get),
    )
    adv_std_scale: bool = _f(True, "divide advantages by the group std; --no-adv-std-scale is Dr. GRPO")
    temperature: float = _f(
        1.0,
        "rollout temperature; every teacher-forced pass divides logits by it",
        check=above(0, "logits are divided by it", noun="a number"),
    )
    top_p: float = _f(1.0, "rollout nucleus sampling", check=Bound(0, 1, low_open=True))
    top_k: int = _f(0, "rollout top-k sampling; 0 = off", check=at_least(0, "0 = off"))
    repetition_penalty: float = _f(
        1.0,
        "rollout repetition penalty; 1 = off. Any other value samples from another distribution than "
        "the one trained (off-policy, which the PPO ratio does not correct). The checkpoint's own "
        "generation_config.json (Qwen2.5-VL-Instruct ships 1.05) is never applied to rollouts",
        check=above(0, "1 = off"),
    )
    max_new_tokens: int = _f(96, "max response tokens (paper: 4096)", check=POSITIVE)
    seed_per_prompt: bool = _f(
        False,
        "sample each prompt's group from its own seed (one generate call per prompt): rollouts then do "
        "not depend on the rest of the batch or on the number of processes",
    )
    generation_batch_size: int | None = _safe(
        None,
        "rollout rows per generate call, rounded down to whole groups (at least one), so that one call's "
        "KV cache stays bounded; none = sized from memory on CUDA (half the free memory over one row's "
        "KV cache for prompt + max_new_tokens tokens, at most 256 rows), 64 on the CPU. With "
        "--seed-per-prompt the samples do not depend on it; without, one random stream runs through "
        "the calls, so another size draws other samples (docs/training.md)",
        check=at_least(1, "or none = sized from memory"),
    )
    rollout_engine: Literal["cppo", "cppo-graphs", "hf"] = _safe(
        "cppo",
        "cppo: each prompt prefilled once for its group, finished rows out of the batch; cppo-graphs: "
        "the same with the decode step as a CUDA graph (CUDA only); hf: transformers' generate on each "
        "prompt repeated G times (for comparison)",
    )
    # --- CPPO
    preset: str = _f(
        "paper",
        "perturbation preset (a registered name or a preset .yaml) giving each prompt its I+ and I- views",
        check=Lookup(get_preset),
    )
    # --- PAPO (arXiv 2507.06448), selected by --algo papo
    papo_gamma: float = _f(
        0.01, "weight of PAPO's implicit perception loss (KL to the masked-image policy)", check=OFF_AT_0
    )
    papo_preset: str = _f("papo", "perturbation preset for PAPO's masked image", check=Lookup(get_preset))
    papo_entropy_coef: float = _f(
        0.03, "weight of PAPO's double-entropy regulariser; 0 = off", check=OFF_AT_0
    )
    papo_clip: float | None = _f(
        None,
        "per-token cap on PAPO's divergence against KL hacking; None = off",
        check=above(0, "or none to turn it off"),
    )
    # --- rewards
    rewards: list[str] = _f(
        ["accuracy", "format"],
        "reward functions: registered names or a user function "
        "as module:function or path.py:function, fn(response, answer, sample) -> float",
        check=Lookup(_reward),
    )
    reward_weights: list[float] = _f([0.9, 0.1], "one weight per reward function (paper: 0.9, 0.1)")
    reward_timeout: float = _safe(
        60.0,
        "seconds one reward call may take; a slower call scores 0 and is logged in reward_errors.jsonl "
        "(the call is abandoned on its thread), and so do that function's other calls of the step; "
        "0 = no limit",
        check=OFF_AT_0,
    )
    reward_hang_steps: int = _safe(
        3,
        "stop the run when a reward function times out before returning anything in this many steps "
        "in a row; 0 = never stop (it scores 0 in those steps)",
        check=OFF_AT_0,
    )
    drop_hung_rewards: bool = _safe(
        False,
        "instead of stopping (reward_hang_steps), go on without the hung function: it scores 0 and is not "
        "called again",
    )
    # --- compute
    logits_chunk_size: int = _safe(
        256,
        "response positions per chunk of the output head (entropy, log-probs)",
        check=POSITIVE,
    )
    sort_by_length: bool = _safe(
        False,
        "sort each mini-batch's rows by length (prompt + response tokens) into its micro-batches, so "
        "that each micro-batch, cut to its own longest row, holds less padding. Same number and sizes "
        "of micro-batches, but other rows share a micro-batch: under token-mean aggregation (and for "
        "CPL) the update then weighs tokens differently, and K processes no longer equal one",
    )
    prefetch: bool = _safe(
        True,
        "prepare the next step's prompts (images, views, processor outputs) in a background thread "
        "while the current step runs; same results as preparing them in turn",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = _f(
        "auto",
        "compute precision of the forwards: auto|float32|bfloat16; auto = bfloat16 on CUDA, float32 "
        "else. Parameters, gradients and optimizer state stay float32 (master weights) unless --pure-bf16",
    )
    pure_bf16: bool = _f(
        False,
        "hold parameters, gradients and AdamW state in bfloat16 too, with no float32 master copy: saves "
        "about 8 of 16 bytes per parameter, but every update smaller than ~|w|/256 rounds away (at lr "
        "1e-6 about 99 percent of the weights never move). Needs bfloat16 compute",
    )
    device: Literal["auto", "cpu", "cuda"] = _safe(
        "auto",
        "auto|cpu|cuda: auto = what accelerate picks (CUDA when present); cuda is refused "
        "when this torch sees no CUDA device. CUDA_VISIBLE_DEVICES and the launcher choose the GPUs",
    )
    dist_timeout: float = _safe(
        3600.0,
        "seconds a collective between processes may wait (the process group's timeout; torch's NCCL "
        "default is 600): a process that stalled or died then stops the others with an error naming "
        "this option instead of a hang. The longest wait a healthy run has is the resume check, which "
        "reads every byte of the checkpoint (split across processes, but a file is read by one): the "
        "largest file of an unsharded 7B checkpoint, trainer_state.pt with AdamW (~56 GB), takes ~19 "
        "min at 50 MB/s (a slow network disk), so 3600 leaves three times that",
        check=above(0, noun="a number of seconds"),
    )
    gradient_checkpointing: bool | str = _safe(
        "auto",
        "recompute activations in backward: true | false | auto (on with CUDA, off on the CPU: "
        "docs/benchmarks.md measures the trade). Paper: on",
    )
    ref_offload: bool = _safe(
        False,
        "keep the frozen reference's weights in CPU memory on a CUDA run; its passes still run on the "
        "GPU (unsharded: copied there for each step's reference pass; under FSDP: each unit's shard "
        "when gathered). No effect on the CPU",
    )
    freeze_vision: bool = _f(
        True,
        "freeze the vision tower and its merger; train only the language model (the demo's setting; "
        "--no-freeze-vision trains the whole model, as the paper configs in examples/configs do)",
    )
    lora_r: int = _f(0, "LoRA rank; 0 = full finetuning (LoRA needs peft installed)", check=OFF_AT_0)
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(0.0, "LoRA dropout", check=OFF_AT_0)
    lora_targets: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "module names LoRA wraps")
    # --- run
    save_every: int = _safe(
        0,
        "checkpoint every N steps (and at the end); 0 = only at the end",
        check=OFF_AT_0,
    )
    keep_last: int = _safe(2, "checkpoints kept; older ones are deleted; 0 = keep all", check=OFF_AT_0)
    export_pretrained: bool = _safe(
        False,
        "under FSDP, every checkpoint also holds the gathered from_pretrained weights (model.safetensors, "
        "written by rank 0), not only each process's shards; the run's last checkpoint always does. "
        "Unsharded runs always save from_pretrained weights",
    )
    keep_best: bool = _safe(
        False,
        "also keep the checkpoint with the best eval/accuracy (checkpoints/best.json names it), outside "
        "keep_last; needs eval_every",
    )
    eval_every: int | None = _safe(None, "evaluate on eval_data every N steps and at the end; none: 10 "
        "without --data (the demo), else 0 = never", check=at_least(0, "or none"))  # fmt: skip
    eval_samples: int | None = _safe(None, "K of avg@K; none: 4 without --data, else 1", check=POSITIVE)
    eval_limit: int | None = _safe(
        64, "eval_data items an evaluation answers (the first); none = all (paper)", check=at_least(1)
    )
    eval_at_start: bool | str = _safe("auto", "evaluate at step 0 too: true | false | auto (without --data)")
    eval_views: str | None = _safe(None, "also evaluate under this preset's views (eval/views/*, one "
        "draw a kind); none = off", check=Lookup(lambda p: p is None or get_preset(p)))  # fmt: skip
    log_rollouts: int = _safe(4, "rollouts per step written to rollouts.jsonl; 0 = none", check=OFF_AT_0)
    resume: str | None = _safe(
        None,
        "checkpoint folder to resume from, or auto = the latest complete one in output_dir "
        "(none there: start at step 0)",
    )
    overwrite: bool = _safe(
        False,
        "start afresh in an output_dir that holds an earlier run: once this run's checks have passed "
        "(config, rewards, data, model), the earlier run's config.yaml, metrics.jsonl, rollouts.jsonl, "
        "reward_errors.jsonl, *.earlier-K.jsonl, curves.png, tb/ and checkpoints/ are deleted (other "
        "files, such as the generated shapes/ data, stay). Without it, or --resume, such a folder is refused",
    )
    force_resume: bool = _safe(
        False,
        "resume although the config differs from the checkpoint's in a field that changes training "
        "(model, data, group_size, seed, ...), or from an older checkpoint whose newer siblings in "
        "output_dir are then deleted",
    )
    max_bad_steps: int = _safe(
        5,
        "stop the run after this many consecutive steps with a skipped (NaN/inf loss or gradient) "
        "optimizer update; 0 = never stop",
        check=OFF_AT_0,
    )
    tensorboard: bool = _safe(True, "TensorBoard scalars in tb/ (when installed), as --report-to tensorboard")
    report_to: list[str] = _safe(["none"], "trackers (TRL's report_to): none | all | tensorboard wandb "
        "trackio mlflow comet_ml aim clearml dvclive swanlab", check=Lookup(tracker_name))  # fmt: skip
    project: str = _safe("cppo", "the trackers' project (W&B and trackio project, MLflow experiment)")
    run_name: str | None = _safe(None, "the trackers' run name; none = the run directory's name")
    rollout_table_every: int = _safe(10, "rollouts to trackers with tables every N steps", check=OFF_AT_0)

    def __post_init__(self):  # betas as a tuple, the defaults that depend on other fields, N -> B
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if self.max_steps is None and self.epochs is None:
            self.max_steps = DEFAULT_MAX_STEPS
        if self.output_dir is None:  # each algorithm its own default folder, so that runs never collide
            self.output_dir = f"runs/{self.algo}"
        demo = self.data is None  # the demo shows its held-out avg@4 rise (its gain is in sampling)
        self.eval_every = (10 if demo else 0) if self.eval_every is None else self.eval_every
        self.eval_samples = (4 if demo else 1) if self.eval_samples is None else self.eval_samples
        if self.rollouts_per_step is not None:  # B is the one number the rest of the code reads
            if problem := _rollouts_problem(self):
                raise ConfigError(problem)
            self.prompts_per_step = self.rollouts_per_step // max(self.group_size, 1)
            self.rollouts_per_step = None
        self.validate()

    @property
    def rollouts(self) -> int:
        """N = B·G, rollouts per step."""
        return self.prompts_per_step * self.group_size

    def validate(self) -> None:
        """Raise ConfigError listing every problem, each with what to change. It changes nothing and
        writes nothing (a preset given as a .yaml path is read to check it)."""
        errors = [problem] if (problem := _rollouts_problem(self)) else []
        errors += (
            field_problems(self)
            + self.cpl_problems()
            + batch_problems(
                self.prompts_per_step, self.group_size, self.mini_batch_size, self.micro_batch_size
            )
        )
        if self.keep_best and not self.eval_every:
            errors.append("keep_best needs evaluations to compare: set --eval-every N (or drop --keep-best)")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            errors.append(f"min_pixels {self.min_pixels} is over max_pixels {self.max_pixels}")
        if self.pure_bf16 and self.dtype == "float32":
            errors.append("pure_bf16 needs bfloat16 compute: set --dtype bfloat16 (or drop --pure-bf16)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            errors.append(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.rewards:
            errors.append("rewards is empty: give at least one reward function (e.g. --rewards accuracy)")
        if len(self.reward_weights) != len(self.rewards):
            errors.append(
                f"{len(self.rewards)} reward functions ({', '.join(self.rewards)}) but "
                f"{len(self.reward_weights)} reward_weights: give one weight per function"
            )
        if not all(math.isfinite(w) for w in self.reward_weights):
            errors.append(f"reward_weights must be finite numbers, got {list(self.reward_weights)}")
        elif self.reward_weights and not any(self.reward_weights):
            errors.append("reward_weights are all 0, so every reward and advantage is 0: give a weight != 0")
        if not str(self.output_dir).strip():
            errors.append("output_dir is empty: name a run directory, or leave it out for runs/<algo>")
        if self.overwrite and self.resume:
            errors.append(
                "overwrite deletes the run that resume would continue: give --resume or --overwrite, not both"
            )
        if self.rollout_engine == "cppo-graphs" and self.device == "cpu":
            errors.append("rollout_engine cppo-graphs runs CUDA graphs: use --rollout-engine cppo on the CPU")
        if self.lora_r and not self.lora_targets:
            errors.append("lora_r > 0 needs at least one module name in lora_targets")
        if len(names := [reward_name(spec) for spec in self.rewards]) != len(set(names)):
            errors.append(f"reward names must be distinct, got {names}")
        if errors:  # one line, as every refusal of the commands (docs/reliability.md)
            raise ConfigError("invalid config: " + "; ".join(errors))

    def to_dict(self) -> dict:
        """field -> value, tuples as lists (as a YAML file holds them)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def resume_safe_fields() -> frozenset[str]:
    """The fields a resume may change without changing what is trained (run length, logging, compute
    layout); max_steps stretches a linear/cosine schedule, and the loop warns when it does."""
    return frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume_safe"))


def _rollouts_problem(cfg: TrainConfig) -> str | None:
    n, g = cfg.rollouts_per_step, cfg.group_size
    if n is not None and g >= 1 and (n < g or n % g):
        return (
            f"batch of {n} rollouts is not divisible by group size {g}: set "
            f"--rollouts-per-step to a multiple of {g} (e.g. {max(1, n // g) * g})"
        )
    return None
