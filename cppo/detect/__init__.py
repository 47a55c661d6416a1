"""cppo.detect: which response tokens depend on the image (METHOD.md section 2).

The pure tensor functions live in ``cppo.detect.select``; the trainer and ``cppo.loss`` call them.
``cppo.detect.detector`` runs the model passes (``PerceptionDetector``), ``cppo.detect.report`` writes
what ``cppo-detect`` shows.
"""

from cppo.detect.detector import (
    DetectError,
    Detection,
    Example,
    PerceptionDetector,
    ResponseTooLongError,
    detect,
)
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
    "DetectError",
    "Detection",
    "Example",
    "PerceptionDetector",
    "ResponseTooLongError",
    "detect",
    "SELECTORS",
    "chunked_entropy_and_logprob",
    "chunked_kl",
    "get_selector",
    "register_selector",
    "select_perception_tokens",
    "token_entropy",
    "top_fraction_per_row",
]
