"""Per-token entropy, and chunked entropy/log-prob/KL through the output head.

docs/method.md §2 (the entropies the selection ranks) and 5.8 (never all (N, T, V) logits at
once). Pure tensor functions: the detector, the trainer (``cppo.response_stats``) and ``cppo.loss`` all
call these, so there is exactly one copy of each.

Letters: N responses (= B prompts x G group), T response tokens, D hidden size, V vocabulary.

Position convention for the chunked functions: ``hidden[:, t]`` (or ``logits[:, t]``) is the state
whose next-token distribution scores ``target_ids[:, t]``; shift by one before calling (the usual
``logits[:, :-1]`` against ``input_ids[:, 1:]``, restricted to the response).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

Head = torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None


# ---------------------------------------------------------------- entropy and log-probs


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 are kept (float64 for gradcheck)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    # -sum p log p over V. Positions with logp = -inf (masked vocabulary) add 0; filling them before
    # the product keeps the backward free of 0 * inf.
    logp_safe = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    return -(logp.exp() * logp_safe).sum(dim=-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits / temperature) over the last dimension.

    Args:
        logits: (..., V), any float dtype; the maths runs in float32 (float64 if given float64).
        temperature: the rollout temperature (docs/method.md §5.6: divide in every pass).

    Returns:
        (...) entropy, float32 (or float64). Differentiable; detach it yourself for selection.
    """
    z = _upcast(logits) / temperature  # (..., V)
    return _entropy_from_logp(torch.log_softmax(z, dim=-1))  # (...)


def _apply_head(head: Head, h: torch.Tensor) -> torch.Tensor:
    if head is None:
        return h  # h already holds logits
    if isinstance(head, torch.Tensor):
        return F.linear(h, head)  # (P, D) @ (V, D)^T -> (P, V)
    return head(h)


def _chunked_map(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    inputs: tuple[torch.Tensor, ...],
    mask: torch.Tensor | None,
    chunk_size: int,
    use_checkpoint: bool,
) -> tuple[torch.Tensor, ...]:
    """Apply ``fn`` to chunks of positions of (N, T, ...) inputs; each output of fn is (P,).

    Only positions where ``mask`` is true are computed (others are 0), so padding and prompt
    positions never reach the output head. Under grad, each chunk is checkpointed, so the backward
    recomputes one chunk's (P, V) logits instead of keeping every chunk's alive.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n, t = inputs[0].shape[:2]
    flat = [x.reshape(n * t, *x.shape[2:]) for x in inputs]  # (N*T, ...)
    idx = None
    if mask is not None:
        if mask.shape != (n, t):
            raise ValueError(f"mask must be (N, T) = {(n, t)}, got {tuple(mask.shape)}")
        idx = mask.reshape(-1).bool().nonzero().squeeze(1)  # (P,)
        flat = [x.index_select(0, idx) for x in flat]  # (P, ...)
    p = flat[0].shape[0]
    grad = use_checkpoint and torch.is_grad_enabled()
    pieces: list[tuple[torch.Tensor, ...]] = []
    for s in range(0, max(p, 1), chunk_size):  # one (empty) chunk when p = 0 gives typed empty outputs
        args = [x[s : s + chunk_size] for x in flat]
        pieces.append(_checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
    outs = [torch.cat([pc[j] for pc in pieces]) for j in range(len(pieces[0]))]  # each (P,)
    if idx is not None:
        outs = [torch.zeros(n * t, dtype=o.dtype, device=o.device).index_copy(0, idx, o) for o in outs]
    return tuple(o.reshape(n, t) for o in outs)  # each (N, T)


def chunked_entropy_and_logprob(
    hidden: torch.Tensor,
    head: Head,
    target_ids: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    mask: torch.Tensor | None = None,
    entropy_grad: bool = False,
    checkpoint: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token entropy and log-prob of the target token from ONE pass through the output head.

    Never materialises all (N, T, V) logits: positions are processed ``chunk_size`` at a time, each
    chunk's logits upcast to float32 and divided by ``temperature`` (docs/method.md §5.6, 5.8).

    Args:
        hidden: (N, T, D) last hidden states, or (N, T, V) logits when ``head`` is None.
        head: the output projection: an (V, D) weight (``lm_head.weight``, no bias), any callable
            (P, D) -> (P, V) such as ``model.lm_head``, or None if ``hidden`` is already logits.
        target_ids: (N, T) long, the sampled tokens (already shifted; see the module docstring).
        temperature: the rollout temperature.
        chunk_size: positions per chunk (P). Peak extra memory ~ P * V * 4 bytes (x2 with grad).
        mask: (N, T) bool, optional; only these positions are computed, the rest are 0.
        entropy_grad: if False (default) the entropy is computed from detached logits (no graph).
        checkpoint: under grad, recompute each chunk's logits in backward instead of storing them.

    Returns:
        entropy (N, T), logprob (N, T), float32 (float64 for float64 input). Gradient flows to
        ``logprob`` (and to ``entropy`` if ``entropy_grad``) through ``hidden`` and ``head``.
    """
    if target_ids.shape != hidden.shape[:2]:
        raise ValueError(
            f"target_ids {tuple(target_ids.shape)} must match hidden[:2] {tuple(hidden.shape[:2])}"
        )

    def fn(h: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = _upcast(_apply_head(head, h)) / temperature  # (P, V)
        logp = torch.log_softmax(z, dim=-1)  # (P, V)
        lp = logp.gather(-1, tgt.long().unsqueeze(-1)).squeeze(-1)  # (P,)
        ent = _entropy_from_logp(logp if entropy_grad else logp.detach())  # (P,)
        return ent, lp

    ent, lp = _chunked_map(fn, (hidden, target_ids), mask, chunk_size, checkpoint)
    return ent, lp


def chunked_kl(
    logits_a: torch.Tensor,
    logits_b: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    head: Head = None,
    mask: torch.Tensor | None = None,
    checkpoint: bool = True,
) -> torch.Tensor:
    """Per-token full-vocabulary KL(pi_a || pi_b), chunked over positions.

    Args:
        logits_a, logits_b: (N, T, V) logits of the two views, or (N, T, D) hidden states when a
            ``head`` is given (as in ``chunked_entropy_and_logprob``).
        temperature: divides both views' logits.
        chunk_size, mask, checkpoint: as in ``chunked_entropy_and_logprob``.

    Returns:
        (N, T) KL in nats, float32 (float64 for float64 input); 0 outside ``mask``. Differentiable in
        both arguments (detach the inputs, or run under no_grad, for selection).
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"the two views differ in shape: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")

    def fn(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor]:
        la = torch.log_softmax(_upcast(_apply_head(head, x)) / temperature, dim=-1)  # (P, V)
        lb = torch.log_softmax(_upcast(_apply_head(head, y)) / temperature, dim=-1)  # (P, V)
        ok = torch.isfinite(la)  # where pi_a = 0 the term is 0, whatever pi_b is
        zero = torch.zeros_like(la)
        diff = torch.where(ok, la, zero) - torch.where(ok, lb, zero)  # (P, V)
        return ((la.exp() * diff).sum(dim=-1),)  # (P,)

    (kl,) = _chunked_map(fn, (logits_a, logits_b), mask, chunk_size, checkpoint)
    return kl
