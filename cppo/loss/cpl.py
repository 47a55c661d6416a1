"""The Contrastive Perception Loss (CPL), docs/method.md §3.

Letters: N responses, T response tokens, V vocabulary.

At every selected token, with log-probs of the same sampled token under the three views
(a: original image I, p: preserving view I+, n: removing view I-)::

    D+_t = D(a_t, p_t),  D-_t = D(a_t, n_t)          # D = k3 by default, an estimate of KL(pi_I || pi_view)
    CPL_t = softplus((D+_t - D-_t) / tau)
          = -log( e^{-D+/tau} / (e^{-D+/tau} + e^{-D-/tau}) )   # two-candidate InfoNCE, similarity -D
    L_CPL = sum_t m_t CPL_t / (sum_t m_t + 1e-8)      # agg="token-mean"; exactly 0 when no m_t is set

The gradient flows through all three views (the anchor is not detached: under k3 it pulls pi_I
towards pi_I+ and away from pi_I-); only the mask is detached. Under ``k1`` the anchor cancels
in D+ - D- = n - p, which is what the official asynchronous port computes.

Metrics (detached floats, over the selected tokens; 0.0 when none): ``cpl/loss``, ``cpl/mask_frac``
(selected / response tokens, or / all tokens if no response mask is given), ``cpl/n_tokens``,
``cpl/d_pos``, ``cpl/d_neg``, ``cpl/margin`` (mean D- - D+), ``cpl/acc`` (share with D+ < D-).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cppo.loss.agg import agg_loss
from cppo.loss.divergence import get_divergence
from cppo.loss.entropy import chunked_kl


def _mean(x: torch.Tensor, m: torch.Tensor) -> float:
    return float(x.detach()[m].float().mean()) if bool(m.any()) else 0.0


def cpl_from_divergences(
    d_pos: torch.Tensor,
    d_neg: torch.Tensor,
    mask: torch.Tensor,
    tau: float = 0.1,
    agg: str = "token-mean",
    response_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CPL from per-token divergences already computed (any estimator, any source).

    Args:
        d_pos: (N, T) D+_t, divergence of the anchor to the preserving view.
        d_neg: (N, T) D-_t, divergence of the anchor to the removing view.
        mask: (N, T) bool or 0/1 m_t, the (gated) perception mask; detached here.
        tau: temperature tau of the InfoNCE (paper 0.1).
        agg: aggregation mode (paper: token-mean, i.e. the mean over selected tokens).
        response_mask: (N, T), optional; ANDed onto ``mask`` and used as the ``cpl/mask_frac``
            denominator.

    Returns:
        (loss, metrics). With an empty mask the loss is exactly 0.0 and every gradient is 0.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    m = mask.detach().bool()  # (N, T)
    if response_mask is not None:
        m = m & response_mask.detach().bool()
    margin = d_neg - d_pos  # (N, T)
    loss_mat = F.softplus(-margin / tau)  # (N, T) = softplus((D+ - D-) / tau)
    loss = agg_loss(loss_mat, m, agg)
    denom = response_mask.bool().sum() if response_mask is not None else m.numel()
    metrics = {
        "cpl/loss": float(loss.detach()),
        "cpl/mask_frac": float(m.sum()) / max(int(denom), 1),
        "cpl/n_tokens": float(m.sum()),
        "cpl/d_pos": _mean(d_pos, m),
        "cpl/d_neg": _mean(d_neg, m),
        "cpl/margin": _mean(margin, m),
        "cpl/acc": _mean((margin > 0).float(), m),
    }
    return loss, metrics


def contrastive_perception_loss(
    anchor_logp: torch.Tensor,
    positive_logp: torch.Tensor,
    negative_logp: torch.Tensor,
    mask: torch.Tensor,
    tau: float = 0.1,
    divergence: str = "k3",
    agg: str = "token-mean",
    response_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_CPL on sampled-token log-probs (docs/method.md §3).

    Args:
        anchor_logp: (N, T) a_t = log pi(o_t | I, x, o_<t), with grad; the same tensor as the PPO
            ratio's ``logp``.
        positive_logp: (N, T) p_t = log pi(o_t | I+, x, o_<t), with grad.
        negative_logp: (N, T) n_t = log pi(o_t | I-, x, o_<t), with grad.
        mask: (N, T) m_t from ``perception_mask`` (bool or 0/1; detached).
        tau: InfoNCE temperature tau (0.1).
        divergence: ``k3`` (paper, default), ``k1`` (the official async port) or ``k2``. For the
            full-vocabulary KL use ``contrastive_perception_loss_full``.
        agg: aggregation mode.
        response_mask: (N, T), optional safety AND and the mask_frac denominator.

    Returns:
        (loss, metrics), see ``cpl_from_divergences``.
    """
    d = get_divergence(divergence)
    return cpl_from_divergences(
        d(anchor_logp, positive_logp), d(anchor_logp, negative_logp), mask, tau, agg, response_mask
    )


def contrastive_perception_loss_full(
    anchor_logits: torch.Tensor,
    positive_logits: torch.Tensor,
    negative_logits: torch.Tensor,
    mask: torch.Tensor,
    tau: float = 0.1,
    agg: str = "token-mean",
    temperature: float = 1.0,
    chunk_size: int = 1024,
    head=None,
    response_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_CPL with D = the exact full-vocabulary KL(pi_I || pi_view) at each selected position.

    Args:
        anchor_logits, positive_logits, negative_logits: (N, T, V) logits under I, I+, I- (or
            (N, T, D) hidden states with ``head`` the output projection, see
            ``cppo.loss.entropy.chunked_kl``). All with grad.
        mask: (N, T) m_t. Only selected positions go through the softmax, in chunks.
        tau, agg, response_mask: as in ``contrastive_perception_loss``.
        temperature: the rollout temperature dividing all logits.
        chunk_size: positions per chunk.

    Not in the paper (which estimates the KL from the sampled token); exposed because it removes
    the estimator's variance at the cost of three (P, V) softmaxes per chunk.
    """
    m = mask.detach().bool()
    if response_mask is not None:
        m = m & response_mask.detach().bool()
    kw = dict(temperature=temperature, chunk_size=chunk_size, head=head, mask=m)
    d_pos = chunked_kl(anchor_logits, positive_logits, **kw)  # (N, T), 0 outside m
    d_neg = chunked_kl(anchor_logits, negative_logits, **kw)  # (N, T)
    return cpl_from_divergences(d_pos, d_neg, m, tau, agg, response_mask)
