"""PAPO's implicit perception loss and an entropy bonus, so that CPPO and PAPO are two
configurations of the same pieces.

PAPO (Perception-Aware Policy Optimization, arXiv 2507.06448) adds -gamma * KL(pi(o | I) ||
pi(o | I_mask)) to the GRPO loss: it MAXIMISES the divergence to a masked-image view on every
response token, where CPPO contrasts a preserving and a removing view on selected tokens only.
Maximising an unbounded divergence invites "KL hacking" (the model makes the masked view
degenerate), hence the optional per-token clip here, and PAPO's entropy regulariser on both views,
which ``entropy_bonus`` provides (call it once per view).

Letters: N responses, T response tokens.
"""

from __future__ import annotations

import torch

from cppo.loss.agg import agg_loss
from cppo.loss.divergence import get_divergence


def implicit_perception_loss(
    logp: torch.Tensor,
    masked_logp: torch.Tensor,
    response_mask: torch.Tensor,
    divergence: str = "k3",
    clip: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """-agg(D(logp, masked_logp)): minimising it pushes pi_I away from pi_Imask on sampled tokens.

    Args:
        logp: (N, T) log pi(o_t | I), with grad.
        masked_logp: (N, T) log pi(o_t | I_mask), with grad (as in PAPO; detach it yourself to
            push only the original view).
        response_mask: (N, T).
        divergence: ``k1``, ``k2`` or ``k3``.
        clip: if set, each token's divergence is clamped to at most ``clip`` before aggregation, so a
            token already that far apart gets no further push (zero gradient). None: no clip.
        agg: aggregation mode.

    Returns:
        (loss, metrics) with ``papo/kl_prcp`` (the unclipped mean divergence) and ``papo/clip_frac``.
    """
    d = get_divergence(divergence)(logp, masked_logp)  # (N, T)
    m = response_mask.detach().bool()
    kl_mean = agg_loss(d.detach(), m, agg)
    clipped = torch.zeros_like(m)
    if clip is not None:
        clipped = d.detach() > clip  # (N, T)
        d = torch.clamp(d, max=clip)
    loss = -agg_loss(d, m, agg)
    n = int(m.sum())
    metrics = {
        "papo/loss": float(loss.detach()),
        "papo/kl_prcp": float(kl_mean),
        "papo/clip_frac": float((clipped & m).sum()) / n if n else 0.0,
    }
    return loss, metrics


def entropy_bonus(
    entropy: torch.Tensor, response_mask: torch.Tensor, agg: str = "token-mean"
) -> tuple[torch.Tensor, dict[str, float]]:
    """-agg(H): adding ``coef * loss`` to the objective raises the policy's entropy (coef > 0) or
    lowers it (coef < 0, PAPO's double-entropy regulariser applied to H(I) and H(I_mask)).

    Args:
        entropy: (N, T) per-token entropy WITH grad (``chunked_entropy_and_logprob(...,
            entropy_grad=True)``).
        response_mask: (N, T).
        agg: aggregation mode.
    """
    mean_h = agg_loss(entropy, response_mask, agg)
    return -mean_h, {"entropy/mean": float(mean_h.detach())}
