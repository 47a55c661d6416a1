"""The CPL step of one batch: gate -> I- pass -> perception mask -> I+ pass -> CPL (docs/method.md §2-3).

This is the one copy of the step; `cppo-train`'s perception term (cppo.rl.perception) and the TRL
integration (cppo.integrations.trl) both call `cpl_step`. It is pure: the anchor pass's log-probs and
entropies, the advantages and masks come in as tensors, and the two view passes are run by a
callable the trainer hands in, so no model, batch layout or process group is known here.

    cpl, metrics = cpl_step(logp, entropy, response_mask, advantages, score_view, settings)
    loss = pg_loss + settings.cpl_lambda * cpl

`score_view(rows, view)`, view "negative" (I-) or "positive" (I+), returns `(entropy, logp)` of the
batch rows `rows` under that view, each (len(rows), T); entropy may be None for "positive", which
needs none. It returns None when no process runs the pass; and when `rows` is empty but other
processes need the pass (sharded models: every process must run the same forwards) it runs a
stand-in pass and returns `(None, logp)` of whatever rows it scored, which the step keeps in the
autograd graph at weight 0. A single-process trainer returns None for empty `rows`.

Only the rows that pass the gate (and have an image) get the I- pass, and only those with at least
one selected token get the I+ pass: every other row contributes exactly 0 to L_CPL, so skipping
its passes leaves the loss unchanged (docs/method.md §5.7). `every_row=True` runs both passes on
every row of a batch that needs them, as the official code does: the same loss and gradients,
more passes.

Letters: N rows of the batch, v rows with a view pass, T response tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cppo.loss.cpl import contrastive_perception_loss
from cppo.loss.mask import gate_responses, perception_mask

ViewScorer = Callable[[list[int], str], "tuple[torch.Tensor | None, torch.Tensor] | None"]


def cpl_step(
    anchor_logp: torch.Tensor,
    anchor_entropy: torch.Tensor,
    response_mask: torch.Tensor,
    advantages: torch.Tensor,
    score_view: ViewScorer,
    settings,
    rewards: torch.Tensor | None = None,
    has_image: torch.Tensor | None = None,
    max_reward: float = 1.0,
    every_row: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """lambda-free L_CPL of one batch, and its metrics.

    Args:
        anchor_logp: (N, T) log-probs under I, with grad (the PPO ratio's).
        anchor_entropy: (N, T) H(I) of the same pass (used detached, for the selection).
        response_mask: (N, T) true at response tokens.
        advantages: (N,) A_i.
        score_view: runs a view pass (module docstring).
        settings: a `cppo.loss.settings.CPLSettings` (tau, divergence, gate, selector, rho are read).
        rewards: (N,) r_i, for the `correct` gate; None where the trainer has none.
        has_image: (N,) bool; rows without an image get no CPL. None: every row has one.
        max_reward: the full reward, for the `correct` gate.
        every_row: both view passes on every row when any row needs them (the official code's way).

    Returns:
        (loss, metrics): `cpl/loss` and the other metrics of `contrastive_perception_loss`,
        `cpl/mask_frac` (selected / response tokens of the batch) and `cpl/rows` (rows with a CPL
        term). The loss is an exact 0 inside the graph of every pass run when no token is selected.
    """
    mask = response_mask.bool()  # (N, T)
    gate = gate_responses(advantages, rewards, settings.cpl_gate, max_reward)  # (N,)
    if has_image is not None:
        gate = gate & has_image.to(gate.device).bool()
    if not bool(gate.any()):
        view_rows = []
    else:
        view_rows = list(range(len(gate))) if every_row else gate.nonzero().squeeze(1).tolist()
    negative = score_view(view_rows, "negative")
    if negative is None:  # no process runs I- (nor I+)
        return _no_cpl(anchor_logp)
    entropy_neg, logp_neg = negative  # (v, T)
    if not view_rows:  # a stand-in for other processes: join their I+ pass too
        return _no_cpl(anchor_logp, logp_neg, *_logp_of(score_view([], "positive")))
    sub_rewards = None if rewards is None else rewards[view_rows]
    selected = perception_mask(
        anchor_entropy[view_rows],
        entropy_neg,
        mask[view_rows],
        advantages[view_rows],
        sub_rewards,
        gate=settings.cpl_gate,
        selector=settings.selector,
        top_percent=settings.top_percent,
        max_reward=max_reward,
    )  # (v, T) bool, gated
    if has_image is not None:
        selected &= gate[view_rows].unsqueeze(1)  # every_row: rows without an image select nothing
    keep = list(range(len(view_rows))) if every_row else selected.any(dim=1).nonzero().squeeze(1).tolist()
    kept_rows = [view_rows[i] for i in keep]
    positive = score_view(kept_rows, "positive")
    if not keep:
        return _no_cpl(anchor_logp, logp_neg, *_logp_of(positive))
    cpl, metrics = contrastive_perception_loss(
        anchor_logp[kept_rows],
        positive[1],
        logp_neg[keep],
        selected[keep],
        tau=settings.cpl_tau,
        divergence=settings.cpl_divergence,
        agg="token-mean",
        response_mask=mask[kept_rows],
    )
    metrics["cpl/mask_frac"] = float(selected.sum()) / max(int(mask.sum()), 1)  # of the batch's tokens
    metrics["cpl/rows"] = float(len(keep))
    return cpl, metrics


def _logp_of(scored) -> tuple[torch.Tensor, ...]:
    return () if scored is None else (scored[1],)


def _no_cpl(*graph: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """An exact 0 that stays in the autograd graph of `graph`, and the metrics of an empty CPL."""
    zero = sum(t.sum() * 0.0 for t in graph)
    return zero, {"cpl/loss": 0.0, "cpl/mask_frac": 0.0, "cpl/rows": 0.0}
