"""What the detector takes and gives: an ``Example`` in, a ``Detection`` out, a ``DetectError`` when
an input cannot be used.

``Detection`` holds one response's per-token statistics (entropies under both views, the shift,
the selector's score, the selection) and what is derived from them without a model pass:
re-selection under another selector (``Detection.select``), the top tokens, the summary, and the
example's ``tokens.json`` entry (``to_dict``). ``score_and_select`` is the selection both the
detector's passes and ``Detection.select`` apply (``cppo.loss.select``: one copy of the rule,
shared with the trainer). ``cppo.detect.detector`` runs the passes that fill a ``Detection``.

Letters: N examples, K draws, T response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from cppo.loss.select import get_selector, select_perception_tokens


class DetectError(ValueError):
    """An input the detector cannot use; the message names the example and what is wrong."""


class ResponseTooLongError(DetectError):
    """Prompt + response do not fit in the model's position limit."""


@dataclass
class Example:
    """One prompt: its images (one or several PIL images), the question, an optional response.

    ``response`` is text, a list of token ids, or None (generated). ``name`` labels the example in
    reports (a file name, a ``file:line``); ``extra`` is carried to ``tokens.json`` unchanged.
    """

    images: list[Image.Image]
    prompt: str
    response: str | list[int] | None = None
    name: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Detection:
    """Per-token statistics of one example's response. Tensors are float32 on CPU, shape (T,).

    ``views[k][j]`` is the record ``{"name", "params"}`` of draw k on image j (replay it with
    ``get_perturbation(name).apply(image, params)``); ``perturbed_images[k][j]`` the image itself.
    """

    index: int
    example: Example
    token_ids: list[int]
    token_texts: list[str]
    response_mask: torch.Tensor  # (T,) bool: False only at a generated vision token masked out
    generated: bool
    entropy: torch.Tensor  # (T,) H(I)
    perturbed_entropy: torch.Tensor  # (T,) mean over draws of H(I-)
    shift: torch.Tensor  # (T,) mean over draws of H(I-) - H(I)
    shift_std: torch.Tensor  # (T,) std over draws (0 when K = 1)
    draw_shifts: torch.Tensor  # (K, T)
    kl: torch.Tensor | None  # (T,) mean over draws of KL(pi_I || pi_I-), or None
    score: torch.Tensor  # (T,) the selector's ranking score
    selected: torch.Tensor  # (T,) bool
    selector: str
    top_percent: float
    views: list[list[dict]]
    perturbed_images: list[list[Image.Image]]

    @property
    def response_text(self) -> str:
        return "".join(self.token_texts)

    def select(self, selector: str, top_percent: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(score (T,), selected (T,)) under another selector, from the same statistics (no model pass)."""
        score, selected = score_and_select(
            self.entropy[None],
            self.perturbed_entropy[None],
            self.response_mask[None],
            None if self.kl is None else self.kl[None],
            selector,
            top_percent,
        )  # (1, T) each
        return torch.where(self.response_mask, score[0], torch.zeros_like(score[0])), selected[0]

    def top_tokens(self, k: int = 10, absolute: bool = False) -> list[int]:
        """Positions of the k largest shifts (``absolute``: |shift|), response tokens only, largest first."""
        value = self.shift.abs() if absolute else self.shift  # (T,)
        shift = torch.where(self.response_mask, value, torch.full_like(value, -float("inf")))
        order = torch.argsort(shift, descending=True, stable=True)
        return [int(i) for i in order[: min(k, int(self.response_mask.sum()))]]

    def summary(self) -> dict:
        m = self.response_mask
        cand = (self.shift > 0) & m
        sel = self.selected
        return {
            "tokens": int(m.sum()),
            "positive_shift": int(cand.sum()),
            "selected": int(sel.sum()),
            "mean_shift": _r(self.shift[m].mean()) if m.any() else 0.0,
            "mean_shift_selected": _r(self.shift[sel].mean()) if sel.any() else 0.0,
            "mean_entropy": _r(self.entropy[m].mean()) if m.any() else 0.0,
            "mean_perturbed_entropy": _r(self.perturbed_entropy[m].mean()) if m.any() else 0.0,
        }

    def to_dict(self) -> dict:
        """The example's entry of ``tokens.json`` (floats rounded to 6 decimals)."""
        tokens = []
        for t, (tid, text) in enumerate(zip(self.token_ids, self.token_texts)):
            row = {
                "i": t,
                "id": tid,
                "text": text,
                "entropy": _r(self.entropy[t]),
                "perturbed_entropy": _r(self.perturbed_entropy[t]),
                "shift": _r(self.shift[t]),
                "shift_std": _r(self.shift_std[t]),
                "score": _r(self.score[t]),
                "selected": bool(self.selected[t]),
            }
            if self.kl is not None:
                row["kl"] = _r(self.kl[t])
            if not bool(self.response_mask[t]):
                row["masked"] = True
            tokens.append(row)
        return {
            "index": self.index,
            "name": self.example.name,
            "prompt": self.example.prompt,
            "response": self.response_text,
            "generated": self.generated,
            "selector": self.selector,
            "top_percent": self.top_percent,
            "perturbations": [{"draw": k, "images": imgs} for k, imgs in enumerate(self.views)],
            "summary": self.summary(),
            **({"extra": self.example.extra} if self.example.extra else {}),
            "tokens": tokens,
        }


def _r(x) -> float:
    v = float(x)
    return round(v, 6) if np.isfinite(v) else v


def score_and_select(entropy, perturbed, mask, kl, selector: str, top_percent: float):
    """(score, selected), each (N, T): the selector's ranking score and the ``cppo.loss.select`` mask.

    ``entropy``, ``perturbed`` (mean H(I-)), ``kl`` (or None) are (N, T) float, ``mask`` (N, T) bool.
    """
    score, _ = get_selector(selector)(entropy, perturbed, kl)  # (N, T)
    selected = select_perception_tokens(entropy, perturbed, mask, top_percent, selector=selector, kl=kl)
    return score, selected
