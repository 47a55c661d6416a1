"""CPPO as a TRL trainer: `CPPOTrainer(GRPOTrainer)` adds lambda·CPL to TRL's own GRPO loss.

    from cppo.integrations.trl import CPPOConfig, CPPOTrainer
    processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(model_id, padding_side="left")
    trainer = CPPOTrainer(model=model_id, reward_funcs=[...], args=CPPOConfig(..., cpl_lambda=0.01),
                          train_dataset=..., processing_class=processor)

What it changes in TRL's step (docs/trl.md, docs/method.md §1-3), nothing else:
- after TRL has generated and scored a batch, one I+ and one I- view of each prompt's image(s) are
  drawn, seeded by (view_seed, step, prompt's index in the global generation batch), so every
  process draws the same views for a group and the G rollouts of a prompt share them. They are
  processed once per prompt and carried as per-row lists of tensors (`cpl_pixel_values_plus/minus`),
  which TRL's shuffling and splitting permute and slice like its other per-row lists. Generation,
  with or without vLLM, never sees them.
- in the loss, TRL's `_compute_loss` runs unchanged (every `loss_type`, KL, IS correction, entropy
  masks); its anchor pass on I (log-probs with grad, entropies) is captured and reused. Then the
  CPL step that `cppo-train` runs too (cppo.loss.cpl_step, handed this trainer's view passes): the
  gate (A > 0) picks rows; only those get the I- pass; the selection ranks the entropy shift
  H(I-) - H(I) per response; only rows with a selected token get the I+ pass; the CPL (token mean
  over selected tokens) times lambda, divided like TRL's loss by the gradient accumulation steps, is
  added. Logged as `cpl/loss` (lambda-free) and `cpl/mask_frac`.

Qwen-VL style models only (`pixel_values` packed by patches + `image_grid_thw`). TRL internals used
are checked at construction (`check_trl_internals`).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import trl
from packaging.version import Version
from trl import GRPOConfig, GRPOTrainer

from cppo.loss import CPLSettings, cpl_step
from cppo.models.versions import check_transformers
from cppo.perturb import get_preset

TESTED_TRL = ">=1.16,<1.17"
_VIEWS = ("cpl_pixel_values_plus", "cpl_pixel_values_minus")
# The GRPOTrainer methods this module overrides or calls, with the parameters it passes.
_INTERNALS = {
    "_get_per_token_logps_and_entropies": (
        "model",
        "input_ids",
        "attention_mask",
        "logits_to_keep",
        "compute_entropy",
        "pixel_values",
        "image_grid_thw",
        "num_images",
        "mm_token_type_ids",
    ),
    "_compute_loss": ("model", "inputs"),
    "_generate_and_score_completions": ("inputs",),
    "_prepare_inputs": ("generation_batch",),
}


def check_trl_internals(cls=GRPOTrainer) -> None:
    """Raise, naming the TRL range to pin, when the GRPOTrainer internals this module uses changed."""
    problems = []
    for name, params in _INTERNALS.items():
        fn = getattr(cls, name, None)
        if fn is None:
            problems.append(f"GRPOTrainer.{name} is gone")
            continue
        sig = inspect.signature(fn)
        if missing := [p for p in params if p not in sig.parameters]:
            problems.append(f"GRPOTrainer.{name} lost {missing}")
        if name == "_get_per_token_logps_and_entropies" and str(sig.return_annotation).count(",") != 2:
            problems.append(f"{name} no longer returns (logps, entropies, aux_loss)")
    for attr in ("split_tensor_dict", "shuffle_sequence_dict", "split_pixel_values_by_grid"):
        if not hasattr(trl.trainer.grpo_trainer, attr):
            problems.append(f"trl.trainer.grpo_trainer.{attr} is gone")
    if problems:
        raise RuntimeError(
            f"cppo.integrations.trl needs trl{TESTED_TRL} (pip install 'trl{TESTED_TRL}'); trl "
            f"{trl.__version__} is installed and changed: " + "; ".join(problems)
        )
    if not Version("1.16") <= Version(trl.__version__) < Version("1.17"):
        warnings.warn(
            f"cppo.integrations.trl is tested with trl{TESTED_TRL}, not {trl.__version__}", stacklevel=3
        )


@dataclass
class CPPOConfig(GRPOConfig, CPLSettings):
    """GRPOConfig plus the CPL's settings (cppo.loss.CPLSettings, the same fields and defaults as
    cppo-train's: the paper's) and the views' preset and seed."""

    preset: str = field(default="paper", metadata={"help": "cppo.perturb preset of the I+/I- views"})
    view_seed: int = field(default=0, metadata={"help": "seed of the views (with the step and prompt)"})

    def __post_init__(self):
        super().__post_init__()
        problems = self.cpl_problems()
        if self.selector == "kl_shift":  # needs the views' full logits, which TRL's passes do not keep
            problems.append("selector 'kl_shift' is not supported here: relative, raw or entropy")
        if self.cpl_gate == "correct":  # TRL's batch carries no rewards
            problems.append("cpl_gate 'correct' is not supported here: positive_advantage or none")
        if self.cpl_divergence == "full":
            problems.append("cpl_divergence 'full' is not supported here: k1, k2 or k3")
        if problems:
            raise ValueError("; ".join(problems))
        get_preset(self.preset)  # fails now on an unknown name


class CPPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer + lambda·CPL (module docstring). Takes GRPOTrainer's arguments."""

    def __init__(self, model, reward_funcs=None, args: CPPOConfig | None = None, **kwargs):
        check_transformers()
        check_trl_internals()
        if not isinstance(args, CPPOConfig):
            raise TypeError("CPPOTrainer needs args=CPPOConfig(...) (a GRPOConfig with the CPL fields)")
        super().__init__(model, reward_funcs, args, **kwargs)
        self._preset = get_preset(args.preset)
        self._draws = (-1, 0)  # (global step, draws in it): a generation's index, the same on every process
        self._anchor: list | None = None

    # ---- views: drawn once per prompt after generation, carried per row ----
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.args.cpl_lambda > 0 and out.get("pixel_values") is not None:
            out.update(self._views(inputs, out))
        return out

    def _views(self, inputs, out) -> dict[str, list[torch.Tensor]]:
        if "image_grid_thw" not in out:
            raise ValueError("CPPOTrainer supports Qwen-VL style models (pixel_values + image_grid_thw) only")
        step = self.state.global_step
        self._draws = (step, self._draws[1] + 1 if self._draws[0] == step else 0)
        group = self.num_generations if self.model.training else self.num_generations_eval
        first = self.accelerator.process_index * len(inputs)  # this process's rows in the global batch
        grids = torch.split(out["image_grid_thw"], out["num_images"])
        width = out["pixel_values"].shape[1:]
        by_prompt, views = {}, {k: [] for k in _VIEWS}
        for i, x in enumerate(inputs):
            p = (first + i) // group  # the prompt's index in the global generation batch
            if p not in by_prompt:
                images = x.get("images") or ([x["image"]] if x.get("image") is not None else [])
                pos, neg = [], []
                for k, image in enumerate(images):
                    seed = np.random.SeedSequence([self.args.view_seed, *self._draws, p, k])
                    plus, minus, _ = self._preset.draw(image, seed)
                    pos.append(plus)
                    neg.append(minus)
                by_prompt[p] = [self._pixels(v, grids[i], width) for v in (pos, neg)]
            for key, pixels in zip(_VIEWS, by_prompt[p]):
                views[key].append(pixels)  # the same tensor for every row of the group
        return views

    def _pixels(self, images, grid, width) -> torch.Tensor:
        device = self.accelerator.device
        if not images:
            return torch.zeros((0, *width), device=device)
        enc = self.processing_class.image_processor(images=images, return_tensors="pt")
        if not torch.equal(enc["image_grid_thw"].to(grid.device), grid):
            raise ValueError("a view changed the image grid: views must keep the image size")
        return enc["pixel_values"].to(device)

    # ---- loss: TRL's loss, whose anchor pass is captured, plus lambda·CPL ----
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._anchor is not None and not self._anchor:
            self._anchor.append(out)  # the first call inside _compute_loss: the anchor pass on I
        return out

    def _compute_loss(self, model, inputs):
        wanted = self.args.cpl_lambda > 0 and _VIEWS[1] in inputs
        self._anchor = [] if wanted else None
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            anchor, self._anchor = self._anchor, None
        if not wanted:
            return loss
        logps, entropies, _ = anchor[0]
        cpl, mask_frac = self._cpl(model, inputs, logps, entropies)
        mode = "train" if self.model.training else "eval"
        for name, value in (("cpl/loss", cpl.detach()), ("cpl/mask_frac", mask_frac)):
            value = torch.as_tensor(value, dtype=torch.float32, device=logps.device)
            self._metrics[mode][name].append(self.accelerator.gather(value).mean().item())
        scale = self.current_gradient_accumulation_steps if mode == "train" else 1
        return loss + self.args.cpl_lambda * cpl / scale

    def _cpl(self, model, inputs, logps, entropies) -> tuple[torch.Tensor, float]:
        """(lambda-free CPL of this batch, selected / response tokens): cppo.loss.cpl_step, the same
        step as cppo-train's, with this trainer's view passes. TRL's batch carries no rewards, so the
        gate is one that needs none (CPPOConfig checks)."""
        mask = (inputs["completion_mask"] * inputs.get("tool_mask", 1)).bool()
        adv = inputs["advantages"] if inputs["advantages"].dim() == 1 else inputs["advantages"][:, 0]
        has_image = torch.tensor([n > 0 for n in inputs["num_images"]], device=logps.device)

        def score_view(rows: list[int], view, grad: bool = True, lengths=None):
            views = view if isinstance(view, tuple) else (view,)  # a tuple: one forward for all
            keys = [_VIEWS[0] if v == "positive" else _VIEWS[1] for v in views]
            keep = None if lengths is None or not rows else int(lengths.max())
            entropy = view == "negative"  # the selection's pass; the fused gradient pass needs none
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                out = self._view_pass(model, inputs, rows, keys, entropy=entropy, keep=keep)
            if out is None:
                return None
            pairs = [(ent, logps) for logps, ent in out]
            return tuple(pairs) if isinstance(view, tuple) else pairs[0]

        cpl, metrics = cpl_step(
            logps, entropies.detach(), mask, adv, score_view, self.args, has_image=has_image, fuse_views=True
        )
        return cpl, metrics["cpl/mask_frac"]

    def _view_pass(self, model, inputs, rows: list[int], keys: list[str], entropy: bool = False, keep=None):
        """[(logps, entropies)] of `rows` under each view of `keys`, from one forward of the rows once
        per view; None when no process has rows for this pass. `keep`: only the first `keep`
        completion tokens matter; the pass stops there (0 after).

        Sharded models (FSDP, ZeRO-3) need every process to run the same forwards: the processes agree
        on the largest row count, and one without rows scores its first row (the caller weights it 0)."""
        if self.accelerator.num_processes > 1:
            most = self.accelerator.gather(torch.tensor([len(rows)], device=self.accelerator.device)).max()
            if int(most) == 0:
                return None
            rows = rows or [0]
        elif not rows:
            return None
        T = inputs["completion_ids"].size(1)
        t = T if keep is None else max(1, min(keep, T))
        P = inputs["prompt_ids"].size(1)
        k = len(keys)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"][:, :t]], dim=1)[rows].repeat(k, 1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"][:, :t]], dim=1)[rows].repeat(k, 1)
        grids = torch.split(inputs["image_grid_thw"], inputs["num_images"])
        num_images = [inputs["num_images"][r] for r in rows] * k
        kwargs = {}
        if sum(num_images):
            kwargs = dict(
                pixel_values=torch.cat([inputs[key][r] for key in keys for r in rows]),
                image_grid_thw=torch.cat([grids[r] for _ in keys for r in rows]),
                num_images=num_images,
            )
        if "mm_token_type_ids" in inputs:
            kwargs["mm_token_type_ids"] = inputs["mm_token_type_ids"][rows][:, : P + t].repeat(k, 1)
        logps, ent, _ = self._get_per_token_logps_and_entropies(
            model, ids, att, t, compute_entropy=entropy, **kwargs
        )
        if t < T:  # back to the batch's T columns; the cut ones are never read
            logps = torch.nn.functional.pad(logps, (0, T - t))
            ent = None if ent is None else torch.nn.functional.pad(ent, (0, T - t))
        return list(zip(logps.chunk(k), [None] * k if ent is None else ent.chunk(k)))
