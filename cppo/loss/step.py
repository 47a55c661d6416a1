"""The CPL step of one batch: gate -> I- pass -> perception mask -> I+ pass -> CPL (docs/method.md §2-3).

This is the one copy of the step; `cppo-train`'s perception term (cppo.rl.perception) and the TRL
integration (cppo.integrations.trl) both call `cpl_step`. It is pure: the anchor pass's log-probs and
entropies, the advantages and masks come in as tensors, and the view passes are run by a callable
the trainer hands in, so no model, batch layout or process group is known here.

    cpl, metrics = cpl_step(logp, entropy, response_mask, advantages, score_view, settings)
    loss = pg_loss + settings.cpl_lambda * cpl

`score_view(rows, view, grad=True, lengths=None)`, view "negative" (I-) or "positive" (I+), returns
`(entropy, logp)` of the batch rows `rows` under that view, each (len(rows), T); entropy may be None
for "positive", which needs none. `grad=False`: the pass needs no gradient (run it under no_grad).
`lengths` (len(rows),): each row's response tokens that matter are its first `lengths[i]`; the pass
may stop there (a hint: scoring more changes nothing). It returns None when no process runs the
pass; and when `rows` is empty but other processes need the pass (sharded models: every process
must run the same forwards) it runs a stand-in pass and returns `(None, logp)` of whatever rows it
scored, which the step keeps in the autograd graph at weight 0. A single-process trainer returns
None for empty `rows`. The step asks for the same passes, in the same order, on every process.

Which rows get which pass (docs/method.md §5.7): only the rows that pass the gate (and have an
image) get the I- pass, and only those with at least one selected token the I+ pass, which stops at
each row's last selected token: every other row and position contributes exactly 0 to L_CPL.
`every_row=True` runs both passes on every row, to the end, as the official code does: the same loss
and gradients, more work.

`settings.cpl_rows` below 1 (a fraction p: each row drawn with chance p) or above 1 (a count) puts
the perception term on a random sample of the rows with a selected token, an unbiased estimate of
the full term (departure from the paper, which uses every row): the selection of every gated row
comes from an I- pass without gradient, then the drawn rows get the I- and I+ passes with gradient
(one call for both views with `fuse_views`), each cut at its last selected token, and their sum
over selected tokens is divided by the full term's token count and by each row's chance to be
drawn, so that the expected loss and gradient are the full term's (tests/test_loss_step.py). 1.0
runs the full term. With a fraction, each row can bring its own uniform (`row_draws`; cppo-train
derives it from the row's prompt seed), so the same rows are drawn however the batch is split into
micro-batches and processes; a count draws within the batch it is given.

Letters: N rows of the batch, v rows with a view pass, T response tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cppo.loss.cpl import contrastive_perception_loss
from cppo.loss.mask import gate_responses, perception_mask

ViewScorer = Callable[..., "tuple[torch.Tensor | None, torch.Tensor] | None"]


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
    generator: torch.Generator | None = None,
    row_draws: torch.Tensor | None = None,
    fuse_views: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """lambda-free L_CPL of one batch (or its unbiased estimate, `settings.cpl_rows`), and its metrics.

    Args:
        anchor_logp: (N, T) log-probs under I, with grad (the PPO ratio's).
        anchor_entropy: (N, T) H(I) of the same pass (used detached, for the selection).
        response_mask: (N, T) true at response tokens.
        advantages: (N,) A_i.
        score_view: runs a view pass (module docstring).
        settings: a `cppo.loss.settings.CPLSettings` (tau, divergence, gate, selector, rho, rows).
        rewards: (N,) r_i, for the `correct` gate; None where the trainer has none.
        has_image: (N,) bool; rows without an image get no CPL. None: every row has one.
        max_reward: the full reward, for the `correct` gate.
        every_row: both view passes on every row, uncut, when any row needs them (the official way).
        generator: draws the sampled rows (None: torch's global generator).
        row_draws: (N,) one uniform in [0, 1) per row, fixed by the row itself (its prompt's seed):
            with a fraction p, row i is drawn iff row_draws[i] < p, so the sample does not depend on
            how rows are split into micro-batches or processes. None: drawn from `generator`.
        fuse_views: with a sampled term, ask for the drawn rows' I- and I+ gradient passes in one
            call, `score_view(rows, ("negative", "positive"), lengths=...)`, which returns one
            (entropy, logp) per view (None when no process runs it): one forward of 2k rows instead
            of two of k, the same loss and gradients.

    Returns:
        (loss, metrics): `cpl/loss` and the other metrics of `contrastive_perception_loss`,
        `cpl/mask_frac` (selected / response tokens of the batch) and `cpl/rows` (rows whose CPL
        terms were computed). The loss is an exact 0 inside the graph of every pass run when no
        token is selected.
    """
    mask = response_mask.bool()  # (N, T)
    gate = gate_responses(advantages, rewards, settings.cpl_gate, max_reward)  # (N,)
    if has_image is not None:
        gate = gate & has_image.to(gate.device).bool()
    if not bool(gate.any()):
        view_rows = []
    else:
        view_rows = list(range(len(gate))) if every_row else gate.nonzero().squeeze(1).tolist()
    sampled = not every_row and float(settings.cpl_rows) != 1.0
    negative = score_view(view_rows, "negative", grad=not sampled)
    if negative is None:  # no process runs I- (nor anything after it)
        return _no_cpl(anchor_logp)
    fused = sampled and fuse_views
    if not view_rows:  # a stand-in for other processes: join their later passes too
        later = _gradient_passes(score_view, [], None, sampled, fused)
        return _no_cpl(anchor_logp, negative[1], *(out[1] for out in later if out is not None))
    entropy_neg, logp_neg = negative  # (v, T)
    selected = perception_mask(
        anchor_entropy[view_rows],
        entropy_neg,
        mask[view_rows],
        advantages[view_rows],
        None if rewards is None else rewards[view_rows],
        gate=settings.cpl_gate,
        selector=settings.selector,
        top_percent=settings.top_percent,
        max_reward=max_reward,
    )  # (v, T) bool, gated
    if has_image is not None:
        selected &= gate[view_rows].unsqueeze(1)  # every_row: rows without an image select nothing
    with_tokens = selected.any(dim=1).nonzero().squeeze(1).tolist()
    keep = list(range(len(view_rows))) if every_row else with_tokens
    if sampled:  # each row's sum over its tokens, divided by the chance it was drawn: unbiased
        draws = None if row_draws is None else row_draws[view_rows].tolist()  # (v,)
        keep, weight = _sample(with_tokens, settings.cpl_rows, generator, draws)
    kept_rows = [view_rows[i] for i in keep]
    lengths = None if every_row else _last_selected(selected[keep])  # (k,) the passes may stop there
    # sampled: the gradient pass of I- on the drawn rows (their selection came from the first pass)
    negative_grad, positive = _gradient_passes(score_view, kept_rows, lengths, sampled, fused)
    if not keep:
        passes = [out[1] for out in (negative_grad, positive) if out is not None]
        return _no_cpl(anchor_logp, logp_neg, *passes)
    logp_neg_kept = negative_grad[1] if sampled else logp_neg[keep]
    cpl, metrics = contrastive_perception_loss(
        anchor_logp[kept_rows],
        positive[1],
        logp_neg_kept,
        selected[keep],
        tau=settings.cpl_tau,
        divergence=settings.cpl_divergence,
        agg="token-mean",
        response_mask=mask[kept_rows],
    )
    if sampled:  # from the sample's token mean to the unbiased estimate of the full token mean
        tokens_all = int(selected.sum())
        cpl = cpl * (weight * int(selected[keep].sum()) / max(tokens_all, 1))
        metrics["cpl/loss"] = float(cpl.detach())
    metrics["cpl/mask_frac"] = float(selected.sum()) / max(int(mask.sum()), 1)  # of the batch's tokens
    metrics["cpl/rows"] = float(len(keep))
    return cpl, metrics


def _gradient_passes(score_view, rows: list[int], lengths, sampled: bool, fused: bool) -> tuple:
    """(the I- pass with gradient, sampled only, else None; the I+ pass) of `rows`, cut at `lengths`:
    two calls, or one for both views when `fused`."""
    if fused:
        out = score_view(rows, ("negative", "positive"), lengths=lengths)
        return (None, None) if out is None else tuple(out)
    negative = score_view(rows, "negative", lengths=lengths) if sampled else None
    return negative, score_view(rows, "positive", lengths=lengths)


def _sample(
    rows: list[int], cpl_rows: float, generator: torch.Generator | None, draws: list[float] | None = None
) -> tuple[list[int], float]:
    """(the drawn rows in their order, 1 / the chance of each to be drawn). A fraction p < 1: each row
    independently with chance p (possibly none in a small batch: p x rows are expected), row r iff
    `draws[r]` < p when the rows' own uniforms are given. A count c > 1: c of them (at most all)
    uniformly without replacement, chance c / rows."""
    if not rows:
        return [], 1.0
    if cpl_rows < 1:
        u = torch.rand(len(rows), generator=generator).tolist() if draws is None else [draws[r] for r in rows]
        return [r for r, x in zip(rows, u) if x < cpl_rows], 1.0 / cpl_rows
    n = min(len(rows), int(cpl_rows))
    picked = torch.randperm(len(rows), generator=generator)[:n].sort().values.tolist()
    return [rows[i] for i in picked], len(rows) / n


def _last_selected(selected: torch.Tensor) -> torch.Tensor:
    """(k,) per row, one past its last selected token (0 for a row without one)."""
    T = selected.shape[1]
    position = torch.arange(1, T + 1, device=selected.device).expand_as(selected)  # (k, T)
    return (position * selected).amax(dim=1) if T else torch.zeros(len(selected), dtype=torch.long)


def _no_cpl(*graph: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """An exact 0 that stays in the autograd graph of `graph`, and the metrics of an empty CPL."""
    zero = sum(t.sum() * 0.0 for t in graph)
    return zero, {"cpl/loss": 0.0, "cpl/mask_frac": 0.0, "cpl/rows": 0.0}
