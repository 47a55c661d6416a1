"""Kept as an import path: the selection maths lives in ``cppo.loss.select`` and ``cppo.loss.entropy``.

``from cppo.detect.select import select_perception_tokens`` (and the other names below) keeps
working; new code imports from ``cppo.loss`` (or ``cppo.detect``, which re-exports them).
"""

from cppo.loss.entropy import chunked_entropy_and_logprob, chunked_kl, token_entropy
from cppo.loss.select import (
    SELECTORS,
    get_selector,
    register_selector,
    select_perception_tokens,
    top_fraction_per_row,
)

__all__ = [
    "SELECTORS",
    "chunked_entropy_and_logprob",
    "chunked_kl",
    "get_selector",
    "register_selector",
    "select_perception_tokens",
    "token_entropy",
    "top_fraction_per_row",
]
