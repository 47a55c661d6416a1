"""Per-token divergence estimators from the log-probabilities of one sampled token.

Letters: N responses, T response tokens.

Calling convention of every registered divergence: ``fn(a (N, T), b (N, T)) -> (N, T)``, where
``a = log pi_A(o_t)`` and ``b = log pi_B(o_t)`` are the log-probabilities of the SAME token, sampled
from pi_A. Each is an estimator of KL(pi_A || pi_B) at that position (Schulman's k1/k2/k3,
http://joschu.net/blog/kl-approx.html); with ``u = b - a = log(pi_B / pi_A)``:

- ``k1`` = -u = a - b                 unbiased, can be negative; the official CPPO async port uses it
- ``k2`` = u^2 / 2                    biased, always >= 0
- ``k3`` = exp(u) - u - 1             unbiased, always >= 0 (verl's ``low_var_kl``); the paper's choice

``k3`` carries the paper's clamps: ``u = clamp(u, -20, 20)`` before the exponential and the result
clamped to ``[-10, 10]`` (so its gradient is exactly zero once the estimate passes 10). k1 and k2
are left unclamped, as in their usual definitions.

For CPL: a is the anchor (view I), b the positive or negative view. For the KL to the reference: a is
the policy, b the reference. The full-vocabulary KL, which needs logits rather than one token's
log-prob, is ``cppo.loss.entropy.chunked_kl`` (and ``contrastive_perception_loss_full``).
"""

from __future__ import annotations

import torch

from cppo.registry import Registry

DIVERGENCES = Registry("divergence")
register_divergence = DIVERGENCES.register
get_divergence = DIVERGENCES.get

K3_LOG_RATIO_CLAMP = 20.0
K3_VALUE_CLAMP = 10.0


@register_divergence("k1")
def k1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a - b  # (N, T)


@register_divergence("k2")
def k2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 0.5 * (b - a).square()  # (N, T)


@register_divergence("k3")
def k3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    u = torch.clamp(b - a, -K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)  # (N, T)
    return torch.clamp(torch.exp(u) - u - 1.0, -K3_VALUE_CLAMP, K3_VALUE_CLAMP)  # (N, T)
