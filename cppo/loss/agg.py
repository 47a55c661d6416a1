"""Reduction of a per-token loss matrix to a scalar: the one ``agg_loss`` every loss goes through.

Letters: N responses (= B prompts x G group), T response tokens.

Calling convention of every registered aggregation: ``fn(loss_mat (N, T), mask (N, T) bool,
norm: float | None) -> scalar``. Masked-out positions are excluded with ``torch.where`` (not a
multiply), so a NaN or inf at a padding position cannot leak into the result.

Modes (``m`` the mask, ``l`` the loss, sums over masked tokens):

- ``token-mean``            sum_it m l / (sum_it m + 1e-8)            (DAPO; the paper's CPL mean)
- ``seq-mean-token-mean``   mean over non-empty responses of (sum_t m l / sum_t m)   (original GRPO)
- ``seq-mean-token-sum``    mean over non-empty responses of sum_t m l
- ``seq-mean-token-sum-norm`` sum_it m l / (N * norm), ``norm`` defaults to T: Dr. GRPO's constant
  normaliser, which divides by the same number whatever the responses' lengths.

Every mode gives exactly 0 (with zero, finite gradients) when the mask is empty.
"""

from __future__ import annotations

import torch

from cppo.registry import Registry

AGGREGATIONS = Registry("aggregation")
register_aggregation = AGGREGATIONS.register
get_aggregation = AGGREGATIONS.get


def _masked(loss_mat: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.detach().bool()  # (N, T)
    return torch.where(m, loss_mat, torch.zeros_like(loss_mat)), m


def _mean_over_nonempty(per_seq: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean of per_seq (N,) over the responses with at least one masked token; 0 if there are none."""
    nonempty = m.any(dim=-1)  # (N,)
    per_seq = torch.where(nonempty, per_seq, torch.zeros_like(per_seq))
    return per_seq.sum() / nonempty.sum().clamp(min=1)


@register_aggregation("token-mean")
def token_mean(loss_mat: torch.Tensor, mask: torch.Tensor, norm: float | None = None) -> torch.Tensor:
    lm, m = _masked(loss_mat, mask)
    return lm.sum() / (m.sum() + 1e-8)


@register_aggregation("seq-mean-token-mean")
def seq_mean_token_mean(
    loss_mat: torch.Tensor, mask: torch.Tensor, norm: float | None = None
) -> torch.Tensor:
    lm, m = _masked(loss_mat, mask)
    per_seq = lm.sum(dim=-1) / (m.sum(dim=-1) + 1e-8)  # (N,)
    return _mean_over_nonempty(per_seq, m)


@register_aggregation("seq-mean-token-sum")
def seq_mean_token_sum(loss_mat: torch.Tensor, mask: torch.Tensor, norm: float | None = None) -> torch.Tensor:
    lm, m = _masked(loss_mat, mask)
    return _mean_over_nonempty(lm.sum(dim=-1), m)


@register_aggregation("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(
    loss_mat: torch.Tensor, mask: torch.Tensor, norm: float | None = None
) -> torch.Tensor:
    lm, _ = _masked(loss_mat, mask)
    n, t = lm.shape[0], lm.shape[-1]
    # Dr. GRPO (arXiv 2503.20783): a constant denominator (max response length), no per-length bias.
    return lm.sum() / (n * (float(t) if norm is None else float(norm)))


def agg_loss(
    loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", norm: float | None = None
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

    Args:
        loss_mat: (N, T) per-token loss.
        mask: (N, T) bool or 0/1; which tokens count. Detached.
        mode: one of ``AGGREGATIONS.names()``.
        norm: the constant of ``seq-mean-token-sum-norm`` (default T); ignored by the other modes.

    Returns:
        A scalar tensor with the dtype of ``loss_mat``.
    """
    if loss_mat.shape != mask.shape:
        raise ValueError(f"loss_mat {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} must have one shape")
    return get_aggregation(mode)(loss_mat, mask, norm)
