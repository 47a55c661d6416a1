"""The GRPO base: group advantages, PPO-clip policy losses, and the KL to a frozen reference.

docs/method.md §4. Letters: B prompts, G group size, N = B * G responses (the G rollouts of a
prompt are adjacent), T response tokens.

Calling convention of every registered policy loss (verl ``core_algos`` style)::

    fn(old_logp (N, T), logp (N, T), advantages (N,) or (N, T), response_mask (N, T), *,
       clip_low, clip_high, dual_clip, agg) -> (loss scalar, metrics dict[str, float])

Metric values are detached Python floats under ``grpo/`` keys.
"""

from __future__ import annotations

import torch

from cppo.loss.agg import agg_loss
from cppo.loss.divergence import get_divergence
from cppo.registry import Registry

POLICY_LOSSES = Registry("policy loss")
register_policy_loss = POLICY_LOSSES.register
get_policy_loss = POLICY_LOSSES.get


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> float:
    """Mean of x over m as a detached Python float (0.0 when m is empty)."""
    m = m.bool()
    if not bool(m.any()):
        return 0.0
    return float(x.detach()[m].float().mean())


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO advantages A_i = (r_i - mean_group) / (std_group + eps), unbiased std.

    Args:
        rewards: (N,) with N = B * G, each prompt's G rollouts adjacent.
        group_size: G.
        scale_by_std: False gives Dr. GRPO's A_i = r_i - mean_group (arXiv 2503.20783).
        eps: added to the std (paper 1e-6).

    Returns:
        (N,) float advantages; broadcast them over a response's tokens yourself (``A[:, None]``).

    Two cases are pinned to exactly 0, by choice:
    - a group whose rewards are all equal (its std is 0; computing it would give +-1e-11 noise from
      the inexact mean, which would still open the A > 0 gate of CPL),
    - a group of one (G = 1: there is no baseline to compare with; the unbiased std is undefined).
      verl instead uses mean 0, std 1 there, i.e. the raw reward as the advantage.
    """
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            "rewards must be (N,) with N divisible by group_size; "
            f"got {tuple(rewards.shape)} and G={group_size}"
        )
    r = rewards.float().view(-1, group_size)  # (B, G)
    if group_size == 1:
        return torch.zeros_like(r).view(-1)  # (N,)
    centred = r - r.mean(dim=-1, keepdim=True)  # (B, G)
    adv = centred / (r.std(dim=-1, unbiased=True, keepdim=True) + eps) if scale_by_std else centred
    all_equal = r.max(dim=-1, keepdim=True).values == r.min(dim=-1, keepdim=True).values  # (B, 1)
    return torch.where(all_equal, torch.zeros_like(adv), adv).view(-1)  # (N,)


def _per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return advantages.unsqueeze(-1) if advantages.dim() == like.dim() - 1 else advantages  # (N, 1) or (N, T)


@register_policy_loss("vanilla")
def ppo_clip_loss(
    old_logp: torch.Tensor,
    logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip: max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high)), rho = exp(logp - old_logp).

    Args:
        old_logp: (N, T) log pi_old(o_t), the rollout policy's log-probs (no grad).
        logp: (N, T) log pi_theta(o_t), with grad; the same tensor is CPL's anchor a_t.
        advantages: (N,) or (N, T).
        response_mask: (N, T).
        clip_low, clip_high: eps_low, eps_high (DAPO separates them; both 0.2 in the paper).
        dual_clip: c of dual-clip PPO (arXiv 1912.09729), e.g. 3.0: for A < 0 the loss is capped at
            -A * c. None disables it.
        agg: aggregation mode (see ``cppo.loss.agg``).

    The log-ratio is clamped to [-20, 20] before exp, so a stale token cannot overflow.
    """
    a = _per_token(advantages.detach(), logp)  # (N, 1) or (N, T)
    m = response_mask.detach().bool()  # (N, T)
    log_ratio = torch.clamp(logp - old_logp.detach(), -20.0, 20.0)  # (N, T)
    ratio = torch.exp(log_ratio)  # (N, T)
    pg1 = -a * ratio  # (N, T)
    pg2 = -a * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # (N, T)
    pg = torch.maximum(pg1, pg2)  # (N, T)
    dual = torch.zeros_like(m)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 (e.g. 3.0), got {dual_clip}")
        cap = -a * dual_clip  # (N, 1) or (N, T)
        dual = (a < 0) & (pg > cap)  # (N, T)
        pg = torch.where(a < 0, torch.minimum(pg, cap), pg)  # (N, T)
    loss = agg_loss(pg, m, agg)
    metrics = {
        "grpo/pg_loss": float(loss.detach()),
        "grpo/clip_frac": _masked_mean((pg2 > pg1).float(), m),
        "grpo/dual_clip_frac": _masked_mean(dual.float(), m),
        "grpo/ratio_mean": _masked_mean(ratio, m),
        "grpo/approx_kl_old": _masked_mean(-log_ratio, m),  # k1 estimate of KL(pi_old || pi_theta)
    }
    return loss, metrics


@register_policy_loss("reinforce")
def reinforce_loss(
    old_logp: torch.Tensor,
    logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Unclipped importance-weighted policy gradient, -A * exp(logp - old_logp).

    On-policy (one update per rollout) it has the same gradient as PPO-clip; it is here as the
    no-clipping baseline. The clip arguments are accepted and ignored (one calling convention).
    """
    a = _per_token(advantages.detach(), logp)  # (N, 1) or (N, T)
    m = response_mask.detach().bool()  # (N, T)
    ratio = torch.exp(torch.clamp(logp - old_logp.detach(), -20.0, 20.0))  # (N, T)
    loss = agg_loss(-a * ratio, m, agg)
    return loss, {"grpo/pg_loss": float(loss.detach()), "grpo/ratio_mean": _masked_mean(ratio, m)}


def kl_to_reference(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    response_mask: torch.Tensor,
    divergence: str = "k3",
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """KL(pi_theta || pi_ref) estimated on the sampled tokens (k3 = verl's ``low_var_kl``).

    Args:
        logp: (N, T) policy log-probs, with grad.
        ref_logp: (N, T) frozen reference log-probs (detached here).
        response_mask: (N, T).
        divergence: ``k1``, ``k2`` or ``k3`` (see ``cppo.loss.divergence``).
        agg: aggregation mode.
    """
    kl = get_divergence(divergence)(logp, ref_logp.detach())  # (N, T)
    loss = agg_loss(kl, response_mask, agg)
    return loss, {"grpo/kl": float(loss.detach())}


def grpo_loss(
    old_logp: torch.Tensor,
    logp: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.01,
    kl: str = "k3",
    policy_loss: str = "vanilla",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_PPO-clip + beta * L_KL(ref): the GRPO part of docs/method.md §3's total loss.

    Shapes as in ``ppo_clip_loss``; ``ref_logp`` (N, T) or None (then no KL term, whatever beta).
    Metrics: the policy loss's, ``grpo/kl`` when a reference is given, and ``grpo/loss``.
    """
    loss, metrics = get_policy_loss(policy_loss)(
        old_logp,
        logp,
        advantages,
        response_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
        agg=agg,
    )
    if ref_logp is not None and beta != 0.0:
        kl_loss, kl_metrics = kl_to_reference(logp, ref_logp, response_mask, kl, agg)
        loss = loss + beta * kl_loss
        metrics.update(kl_metrics)
    metrics["grpo/loss"] = float(loss.detach())
    return loss, metrics
