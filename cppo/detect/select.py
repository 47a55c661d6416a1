"""Per-token entropy, chunked entropy/log-prob/KL, and the selection of perception tokens.

METHOD.md section 2. Pure tensor functions: the detector, the trainer and ``cppo.loss`` all call
these, so there is exactly one copy of the selection rule.

Letters: N responses (= B prompts x G group), T response tokens, D hidden size, V vocabulary.

Position convention for the chunked functions: ``hidden[:, t]`` (or ``logits[:, t]``) is the state
whose next-token distribution scores ``target_ids[:, t]``; shift by one before calling (the usual
``logits[:, :-1]`` against ``input_ids[:, 1:]``, restricted to the response).

Selectors
---------
A selector turns per-token statistics into a ranking score and a candidate set; the shared top-k
rule then picks, PER RESPONSE, the ``k = max(1, floor(rho * |C|))`` highest-scoring candidates, ties
at the threshold included (so more than k tokens can be chosen when scores tie), none when
``|C| = 0``. Calling convention of every registered selector::

    fn(entropy (N, T) | None, perturbed_entropy (N, T) | None, kl (N, T) | None)
        -> (score (N, T) float, candidates (N, T) bool)

A selector raises ``ValueError`` if an input it needs is None. The response mask is ANDed onto the
candidates by ``select_perception_tokens`` itself, so no selector can forget it (METHOD.md 5.1).

- ``relative`` (paper default, as the official code): r = relu(dH) / (H(I-) + 1e-6), C = {dH > 0}
- ``raw``: dH = H(I-) - H(I), C = {dH > 0}
- ``kl_shift`` (VPPO-style): the per-token KL(pi_I || pi_I-) over the full vocabulary (see
  ``chunked_kl``), C = {KL > 0}
- ``entropy`` (the 80/20 high-entropy-token rule): H(I), C = every response token; use
  ``top_percent=0.2``
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from cppo.registry import Registry

SELECTORS = Registry("selector")
register_selector = SELECTORS.register
get_selector = SELECTORS.get

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
        temperature: the rollout temperature (METHOD.md 5.6: divide in every pass).

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
    chunk's logits upcast to float32 and divided by ``temperature`` (METHOD.md 5.6, 5.8).

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


# ---------------------------------------------------------------- selectors


def _need(x: torch.Tensor | None, what: str, selector: str) -> torch.Tensor:
    if x is None:
        raise ValueError(f"selector {selector!r} needs {what}; it was None")
    return x.detach().float()


@register_selector("relative")
def relative_shift(entropy, perturbed_entropy, kl=None):
    h = _need(entropy, "entropy", "relative")  # (N, T)
    hm = _need(perturbed_entropy, "perturbed_entropy", "relative")  # (N, T)
    dh = hm - h  # (N, T)
    return torch.relu(dh) / (hm + 1e-6), dh > 0


@register_selector("raw")
def raw_shift(entropy, perturbed_entropy, kl=None):
    dh = _need(perturbed_entropy, "perturbed_entropy", "raw") - _need(entropy, "entropy", "raw")  # (N, T)
    return dh, dh > 0


@register_selector("kl_shift")
def kl_shift(entropy=None, perturbed_entropy=None, kl=None):
    k = _need(kl, "kl (per-token KL between the views, see chunked_kl)", "kl_shift")  # (N, T)
    return k, k > 0


@register_selector("entropy")
def high_entropy(entropy, perturbed_entropy=None, kl=None):
    h = _need(entropy, "entropy", "entropy")  # (N, T)
    return h, torch.ones_like(h, dtype=torch.bool)


@torch.no_grad()
def top_fraction_per_row(score: torch.Tensor, candidates: torch.Tensor, top_percent: float) -> torch.Tensor:
    """Per row, the ``k = max(1, floor(top_percent * |C|))`` highest scores among the candidates C,
    ties at the k-th score included; an empty row selects nothing.

    Args:
        score: (N, T) float. NaN scores are never selected.
        candidates: (N, T) bool.
        top_percent: rho in (0, 1].

    Returns:
        (N, T) bool.

    ``floor`` is taken with a 1e-9 tolerance so that e.g. 0.29 * 100 gives 29, not 28.
    """
    if not 0.0 < top_percent <= 1.0:
        raise ValueError(f"top_percent must be in (0, 1], got {top_percent}")
    score = score.detach().float()  # (N, T)
    cand = candidates.bool() & ~torch.isnan(score)  # (N, T)
    if score.shape[-1] == 0:
        return cand
    s = torch.where(cand, score, torch.full_like(score, -math.inf))  # (N, T)
    count = cand.sum(dim=-1)  # (N,)
    k = torch.floor(count.double() * top_percent + 1e-9).long().clamp(min=1)  # (N,)
    ordered = s.sort(dim=-1, descending=True).values  # (N, T)
    thr = ordered.gather(-1, (k - 1).unsqueeze(-1))  # (N, 1) the k-th largest score
    return cand & (s >= thr)  # (N, T)


@torch.no_grad()
def select_perception_tokens(
    entropy: torch.Tensor | None,
    perturbed_entropy: torch.Tensor | None,
    response_mask: torch.Tensor,
    top_percent: float = 0.5,
    score: str = "relative",
    kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """The perception-token mask of METHOD.md section 2 (before the advantage gate).

    Args:
        entropy: (N, T) H_t(I), entropy under the original image (detached here).
        perturbed_entropy: (N, T) H_t(I-), entropy under the information-removing view.
        response_mask: (N, T) bool or 0/1, true at response tokens; padding and prompt are false.
        top_percent: rho, the fraction of each response's candidates to keep (paper 0.5).
        score: the selector name, one of ``SELECTORS.names()``.
        kl: (N, T) per-token KL(pi_I || pi_I-), only for ``score="kl_shift"``.

    Returns:
        (N, T) bool mask m_t, always a subset of ``response_mask``.

    Departure from the official code: the candidate set is ANDed with the response mask before
    ranking, and k is computed per response; we never rely on padding having zero entropy.
    """
    s, cand = get_selector(score)(entropy, perturbed_entropy, kl)  # (N, T), (N, T)
    if s.shape != response_mask.shape:
        raise ValueError(f"score {tuple(s.shape)} and response_mask {tuple(response_mask.shape)} differ")
    return top_fraction_per_row(s, cand & response_mask.bool(), top_percent)  # (N, T)
