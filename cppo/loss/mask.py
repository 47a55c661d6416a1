"""The CPL token mask: the perception-token selection (``cppo.loss.select``) times a response gate.

docs/method.md §2, last line: m_t <- m_t * [A_i > 0]. Letters: N responses, T response tokens.

Calling convention of every registered gate::

    fn(advantages (N,), rewards (N,) | None, max_reward: float) -> bool (N,)

- ``positive_advantage`` (paper default): A_i > 0, strict, so a group whose rewards are all equal
  (A = 0) gets no CPL.
- ``correct``: r_i >= max_reward - 1e-6, the responses that earned the full reward (1.0 with the
  paper's 0.9 accuracy + 0.1 format).
- ``none``: every response.

Responses whose gate is 0 contribute exactly nothing to CPL, so a trainer may call
``gate_responses`` first and run the I+ / I- passes only for the responses that pass
(docs/method.md §5.7); the loss is unchanged.
"""

from __future__ import annotations

import torch

from cppo.loss.select import select_perception_tokens
from cppo.registry import Registry

GATES = Registry("gate")
register_gate = GATES.register
get_gate = GATES.get


@register_gate("positive_advantage")
def positive_advantage(
    advantages: torch.Tensor, rewards: torch.Tensor | None, max_reward: float
) -> torch.Tensor:
    return advantages > 0  # (N,)


@register_gate("correct")
def correct(advantages: torch.Tensor, rewards: torch.Tensor | None, max_reward: float) -> torch.Tensor:
    if rewards is None:
        raise ValueError("gate 'correct' needs rewards (N,); got None")
    return rewards >= max_reward - 1e-6  # (N,)


@register_gate("none")
def no_gate(advantages: torch.Tensor, rewards: torch.Tensor | None, max_reward: float) -> torch.Tensor:
    return torch.ones_like(advantages, dtype=torch.bool)  # (N,)


@torch.no_grad()
def gate_responses(
    advantages: torch.Tensor,
    rewards: torch.Tensor | None = None,
    gate: str = "positive_advantage",
    max_reward: float = 1.0,
) -> torch.Tensor:
    """Which responses may carry CPL.

    Args:
        advantages: (N,) one GRPO advantage per response (if yours is broadcast to (N, T), pass
            column 0).
        rewards: (N,) scalar rewards, needed by ``correct``.
        gate: one of ``GATES.names()``.
        max_reward: the full reward, for ``correct``.

    Returns:
        (N,) bool.
    """
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be (N,), one per response; got {tuple(advantages.shape)}")
    r = None if rewards is None else rewards.detach()
    return get_gate(gate)(advantages.detach(), r, max_reward).bool()


@torch.no_grad()
def perception_mask(
    entropy: torch.Tensor | None,
    perturbed_entropy: torch.Tensor | None,
    response_mask: torch.Tensor,
    advantages: torch.Tensor,
    rewards: torch.Tensor | None = None,
    gate: str = "positive_advantage",
    selector: str = "relative",
    top_percent: float = 0.5,
    kl: torch.Tensor | None = None,
    max_reward: float = 1.0,
) -> torch.Tensor:
    """m_t of docs/method.md §2: the selected perception tokens of the responses that pass the gate.

    The mask the trainers' CPL step uses (``cppo.loss.step.cpl_step``, on the rows it scored under I-).

    Args:
        entropy: (N, T) H_t(I) (detached here).
        perturbed_entropy: (N, T) H_t(I-).
        response_mask: (N, T) true at response tokens only.
        advantages: (N,) A_i.
        rewards: (N,) r_i, for ``gate="correct"``.
        gate: see ``GATES``.
        selector: see ``cppo.loss.select.SELECTORS`` (``relative``, ``raw``, ``kl_shift``, ``entropy``).
        top_percent: rho (0.5).
        kl: (N, T) per-token KL between the views, for ``selector="kl_shift"``.
        max_reward: the full reward, for ``gate="correct"``.

    Returns:
        (N, T) bool, a subset of ``response_mask``; no grad.
    """
    g = gate_responses(advantages, rewards, gate, max_reward)  # (N,)
    sel = select_perception_tokens(
        entropy, perturbed_entropy, response_mask, top_percent, selector=selector, kl=kl
    )  # (N, T)
    return sel & g.unsqueeze(-1)  # (N, T)
