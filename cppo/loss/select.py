"""The selection of perception tokens: selectors, the per-response top-k rule, the token mask.

docs/method.md §2. Pure tensor functions: the detector, the trainer and ``cppo.loss.mask`` all
call these, so there is exactly one copy of the selection rule. The entropies and the per-token KL
they rank come from ``cppo.loss.entropy``.

Letters: N responses (= B prompts x G group), T response tokens.

Selectors
---------
A selector turns per-token statistics into a ranking score and a candidate set; the shared top-k
rule then picks, PER RESPONSE, the ``k = max(1, floor(rho * |C|))`` highest-scoring candidates, ties
at the threshold included (so more than k tokens can be chosen when scores tie), none when
``|C| = 0``. Calling convention of every registered selector::

    fn(entropy (N, T) | None, perturbed_entropy (N, T) | None, kl (N, T) | None)
        -> (score (N, T) float, candidates (N, T) bool)

A selector raises ``ValueError`` if an input it needs is None. The response mask is ANDed onto the
candidates by ``select_perception_tokens`` itself, so no selector can forget it (docs/method.md §5.1).

- ``relative`` (paper default, as the official code): r = relu(dH) / (H(I-) + 1e-6), C = {dH > 0}
- ``raw``: dH = H(I-) - H(I), C = {dH > 0}
- ``kl_shift`` (VPPO-style): the per-token KL(pi_I || pi_I-) over the full vocabulary (see
  ``cppo.loss.entropy.chunked_kl``), C = {KL > 0}
- ``entropy`` (the 80/20 high-entropy-token rule): H(I), C = every response token; use
  ``top_percent=0.2``
"""

from __future__ import annotations

import math

import torch

from cppo.registry import Registry

SELECTORS = Registry("selector")
register_selector = SELECTORS.register
get_selector = SELECTORS.get


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
    selector: str = "relative",
    kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """The perception-token mask of docs/method.md §2 (before the advantage gate).

    Args:
        entropy: (N, T) H_t(I), entropy under the original image (detached here).
        perturbed_entropy: (N, T) H_t(I-), entropy under the information-removing view.
        response_mask: (N, T) bool or 0/1, true at response tokens; padding and prompt are false.
        top_percent: rho, the fraction of each response's candidates to keep (paper 0.5).
        selector: the selector's name, one of ``SELECTORS.names()``.
        kl: (N, T) per-token KL(pi_I || pi_I-), only for ``selector="kl_shift"``.

    Returns:
        (N, T) bool mask m_t, always a subset of ``response_mask``.

    Departure from the official code: the candidate set is ANDed with the response mask before
    ranking, and k is computed per response; we never rely on padding having zero entropy.
    """
    s, cand = get_selector(selector)(entropy, perturbed_entropy, kl)  # (N, T), (N, T)
    if s.shape != response_mask.shape:
        raise ValueError(f"score {tuple(s.shape)} and response_mask {tuple(response_mask.shape)} differ")
    return top_fraction_per_row(s, cand & response_mask.bool(), top_percent)  # (N, T)
