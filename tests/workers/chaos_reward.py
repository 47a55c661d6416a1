"""User reward functions for tests/test_reliability.py, loaded by cppo-train as `path.py:function`.

- `noisy` draws from Python's and numpy's global generators (what a user reward may do), so a
  resumed run logs the same `reward/noisy` only if those generators are where the uninterrupted
  run had them. With CPPO_TEST_SIGNAL=TERM:9 it sends SIGTERM to its own process at its 9th call
  (the first rollout of step 3 with 4 rollouts per step): a signal that lands mid-rollout.
- `flaky` raises on its first call, returns NaN on its second and 0.5 afterwards.
- `never` never returns (a reward waiting on a server that is down), for tests/test_reward_hang.py.
"""

import os
import random
import signal
import threading

import numpy as np

_calls = {"noisy": 0, "flaky": 0}


def noisy(response: str, answer: str, sample: dict) -> float:
    _calls["noisy"] += 1
    name, _, at = os.environ.get("CPPO_TEST_SIGNAL", "").partition(":")
    if name and _calls["noisy"] == int(at):
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
    return random.random() + float(np.random.rand())  # noqa: NPY002


def flaky(response: str, answer: str, sample: dict) -> float:
    _calls["flaky"] += 1
    if _calls["flaky"] == 1:
        raise ValueError("flaky reward: cannot parse this response")
    if _calls["flaky"] == 2:
        return float("nan")
    return 0.5


def never(response: str, answer: str, sample: dict) -> float:
    threading.Event().wait()
    return 0.0
