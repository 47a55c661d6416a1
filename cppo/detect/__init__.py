"""cppo.detect: which response tokens depend on the image (docs/method.md §2).

The pure tensor functions (entropies, selectors, the selection rule) live in ``cppo.loss.entropy``
and ``cppo.loss.select``, shared with the trainer; the package's names include them.
``cppo.detect.detector`` runs the model passes (``PerceptionDetector``), ``cppo.detect.detection``
holds what they take and give (``Example``, ``Detection``), ``cppo.detect.report`` writes what
``cppo-detect`` shows.
"""

from cppo.detect.detection import DetectError, Detection, Example, ResponseTooLongError
from cppo.detect.detector import PerceptionDetector, detect
from cppo.loss.entropy import chunked_entropy_and_logprob, chunked_kl, token_entropy
from cppo.loss.select import (
    SELECTORS,
    get_selector,
    register_selector,
    select_perception_tokens,
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
