"""A user reward for tests (given to cppo-train as `tests/workers/yes_reward.py:says_yes`)."""

from cppo.grading import last_boxed


def says_yes(response: str, answer: str, sample: dict) -> float:
    """1 when the boxed answer is "yes": a reward the demo model can quickly learn to maximise."""
    return 1.0 if (last_boxed(response) or "").strip().lower() == "yes" else 0.0
