"""A deterministic user reward for the multi-process tests (`tests/workers/length_reward.py:by_length`).

It depends on the response text alone, so one process and two processes that sample the same
responses score them the same, and responses of different lengths get different rewards: the
default CPPO gate (A > 0) then passes on some rows and not on others, differently on each rank.
"""


def by_length(response: str, answer: str, sample: dict) -> float:
    return (len(response) % 3) / 2.0
