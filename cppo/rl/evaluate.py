"""The trainer's import path of the evaluator, which lives in ``cppo.models.evaluate``.

One implementation serves ``cppo-eval``, the trainer's periodic evaluation and the demo model's
recipe; it sits in ``cppo.models`` because the recipe (``cppo.models.warmstart``) uses it and
``cppo.models`` may not import ``cppo.rl`` (docs/architecture.md).
"""

from cppo.models.evaluate import evaluate, format_table, resolve_temperature, score

__all__ = ["evaluate", "format_table", "resolve_temperature", "score"]
