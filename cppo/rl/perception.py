"""The perception term of the update, chosen by name (`--algo`): which views an algorithm's rollouts
need, and what it adds to GRPO's loss for one micro-batch.

    term = get_perception_term(cfg.algo)      # "grpo" | "cppo" | "papo"
    term.views                                # the views each rollout draws and encodes
    getattr(cfg, term.preset_option)          # the preset those views come from
    extra, metrics = term(mb)                 # the weighted term of one micro-batch, or None

Entries, registered like the losses (cppo.registry, after verl's core_algos):

- "grpo": `PerceptionTerm()`, no views and nothing added: GRPO itself;
- "cppo": `ContrastivePerception()`, I+ and I-, lambda·CPL on the perception tokens (docs/method.md
  §2–3), its view passes only on the rows that can carry CPL (§5.7);
- "papo": `ImplicitPerception()`, the masked view only, PAPO's gamma·(-KL) and double-entropy terms
  (arXiv 2507.06448).

`mb` is one micro-batch as cppo.rl.passes.MicroBatch holds it: its rows of the step's rollouts, the
config, the anchor pass's entropies and log-probs, and `mb.view_pass(rows, view)`, which runs a view
pass on some of its rows and keeps the processes of an FSDP run in step (it is the `score_view` of
cppo.loss.cpl_step; cppo.rl.passes' module docstring says how).

Letters: n rows of the micro-batch, v rows with a view pass, T response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cppo.loss import cpl_step, entropy_bonus, gate_responses, implicit_perception_loss
from cppo.registry import Registry

# An entry is a PerceptionTerm: `views`, `preset_option`, `entropy_grad(cfg)`, `__call__(mb)`.
PERCEPTION_TERMS = Registry("algo")
register_perception_term = PERCEPTION_TERMS.register
get_perception_term = PERCEPTION_TERMS.get


@dataclass(frozen=True)
class PerceptionTerm:
    """No perception term (GRPO): no views, nothing added to the loss. The base of the others."""

    views: tuple[str, ...] = ()  # views of each prompt the rollouts draw and encode
    preset_option: str = "preset"  # the config field that names the preset they are drawn from

    def entropy_grad(self, cfg) -> bool:
        """Whether the anchor pass's entropies H(I) must carry a gradient."""
        return False

    def prepare(self, mini) -> dict:
        """Passes without gradient to run once for a whole mini-batch `mini` (a MicroBatch without an
        anchor pass) before its micro-batches; the result is their `MicroBatch.stored`."""
        return {}

    def __call__(self, mb) -> tuple[torch.Tensor | None, dict[str, float]]:
        """(the weighted term to add to the micro-batch's loss, or None; its metrics)."""
        return None, {}


@dataclass(frozen=True)
class ContrastivePerception(PerceptionTerm):
    """CPPO: lambda·L_CPL on the perception tokens, with the anchor as the InfoNCE query.

    The gate (A > 0 by default) picks the rows that may carry CPL; only those rows get the I- pass
    (log-probs for the loss, entropies for the selection), and only rows with at least one selected
    token get the I+ pass. A row outside that set contributes exactly 0 to L_CPL, so its passes are
    skipped without changing the loss (docs/method.md §5.7). `every_row=True` runs both passes on
    every row of a micro-batch that needs them, as the official code does: the same loss and
    gradients (tests/test_rl_update.py), more passes (bench/bench_step.py measures them).
    """

    views: tuple[str, ...] = ("positive", "negative")
    every_row: bool = False
    # with a sampled term (--cpl-rows below 1): the selection's I- pass for the whole mini-batch
    # before its micro-batches (`prepare`), and the drawn rows' I- and I+ passes in one forward;
    # False: each micro-batch runs its own, one view a forward (the same loss and gradients)
    batch_passes: bool = True

    def __call__(self, mb):
        if not mb.cfg.cpl_lambda > 0:
            return None, {}
        cpl, metrics = _cpl(mb, self.every_row, self.batch_passes)
        return mb.cfg.cpl_lambda * cpl, metrics

    def prepare(self, mini) -> dict:
        """With a sampled term (`--cpl-rows` below 1), the selection's I- pass without gradient over
        every gated row of the mini-batch, in forwards of 4 micro-batches' rows: cpl_step asks each
        micro-batch for exactly these rows, and the parameters do not change within a mini-batch,
        so this is the same pass in fewer, larger forwards (a step of the demo: 27 forwards of 2-3
        rows became 4 of up to 16)."""
        cfg, ro, rows = mini.cfg, mini.ro, mini.rows
        if not cfg.cpl_lambda > 0 or self.every_row or not self.batch_passes or float(cfg.cpl_rows) == 1.0:
            return {}  # the same on every process: a process without images joins with a stand-in
        gate = gate_responses(ro.advantages[rows], ro.rewards[rows], cfg.cpl_gate, sum(cfg.reward_weights))
        gated = (gate & ro.has_image[rows].bool()).nonzero().squeeze(1).tolist()  # indices into rows
        return mini.stored_passes(gated, "negative", chunk=4 * cfg.micro_batch_size)


@dataclass(frozen=True)
class ImplicitPerception(PerceptionTerm):
    """PAPO (arXiv 2507.06448) on the image rows: gamma·(-KL(pi_I || pi_Imask)) on every response
    token, plus the double-entropy regulariser eta·(H(I) + H(Imask)) that keeps the maximised KL from
    being won by making either view's distribution flat. The masked view comes from `papo_preset`."""

    views: tuple[str, ...] = ("negative",)  # PAPO contrasts the original with the removing view only
    preset_option: str = "papo_preset"

    def entropy_grad(self, cfg) -> bool:
        return cfg.papo_entropy_coef > 0

    def __call__(self, mb):
        return _papo(mb)


register_perception_term("grpo")(PerceptionTerm())
register_perception_term("cppo")(ContrastivePerception())
register_perception_term("papo")(ImplicitPerception())


def _cpl(mb, every_row: bool, fuse_views: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """lambda-free CPL of a micro-batch: cppo.loss.cpl_step with the micro-batch's view passes."""
    cfg, ro, rows = mb.cfg, mb.ro, mb.rows
    device = mb.logp.device
    return cpl_step(
        mb.logp,
        mb.entropy,
        ro.response_mask[rows].to(device),
        ro.advantages[rows].to(device),
        mb.view_pass,
        cfg,
        rewards=ro.rewards[rows].to(device),
        has_image=ro.has_image[rows].to(device),
        max_reward=sum(cfg.reward_weights),
        every_row=every_row,
        row_draws=None if ro.row_draws is None else ro.row_draws[rows],
        fuse_views=fuse_views,  # the drawn rows' I- and I+ gradient passes in one forward
    )


def _papo(mb) -> tuple[torch.Tensor, dict[str, float]]:
    """PAPO's gamma-weighted KL and eta-weighted entropy terms of a micro-batch's image rows."""
    cfg, ro, rows, entropy, logp = mb.cfg, mb.ro, mb.rows, mb.entropy, mb.logp
    device = logp.device
    image_rows = [i for i, r in enumerate(rows) if bool(ro.has_image[r])] if ro.views else []
    use_entropy = cfg.papo_entropy_coef > 0
    masked = mb.view_pass(image_rows, "negative", entropy_grad=use_entropy)
    if masked is None or not image_rows:  # nobody runs it, or a stand-in for other processes
        return logp.sum() * 0.0 + (0.0 if masked is None else masked[1].sum() * 0.0), {}
    ent_m, logp_m = masked
    mask = ro.response_mask[rows].to(device)[image_rows]
    kl_loss, metrics = implicit_perception_loss(
        logp[image_rows], logp_m, mask, divergence=cfg.cpl_divergence, clip=cfg.papo_clip, agg=cfg.loss_agg
    )
    loss = cfg.papo_gamma * kl_loss
    if use_entropy:
        bonus_i, _ = entropy_bonus(entropy[image_rows], mask, cfg.loss_agg)  # -H(I)
        bonus_m, m = entropy_bonus(ent_m, mask, cfg.loss_agg)  # -H(Imask)
        loss = loss - cfg.papo_entropy_coef * (bonus_i + bonus_m)
        metrics["papo/entropy_masked"] = m["entropy/mean"]
    return loss, metrics
