"""cppo.detect: which response tokens depend on the image (METHOD.md section 2).

The pure tensor functions live in ``cppo.detect.select``; the trainer and ``cppo.loss`` call them.
"""

from cppo.detect.select import (
    SELECTORS,
    chunked_entropy_and_logprob,
    chunked_kl,
    get_selector,
    register_selector,
    select_perception_tokens,
    token_entropy,
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
