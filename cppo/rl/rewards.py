"""Reward functions: a registry of named functions, user functions by path, and the weighted scorer.

Calling convention of every reward: ``fn(response: str, answer: str, sample: dict) -> float``, where
``sample`` is ``cppo.rl.data.Sample.to_dict()`` (question, answer, question_type, images, source and
the dataset's extra columns).

Built in (docs/method.md §4): ``accuracy`` grades the last ``\\boxed{...}`` against the truth with
``cppo.grading`` (numbers, fractions, LaTeX through math-verify, option letters) and ``format``
checks ``<think>...</think>...\\boxed{...}``; the default total is 0.9 accuracy + 0.1 format.
``accuracy_mathruler`` is the official code's accuracy (mathruler's ``extract_boxed_content`` +
``grade_answer``, as in verl's geo3k and EasyR1's math rewards): ``--rewards accuracy_mathruler
format --reward-weights 0.9 0.1`` is the paper's reward. It needs ``pip install 'cppo[grading]'``;
docs/rewards.md measures how often the two accuracies agree and which is right where they differ.

A registered reward may carry ``requires``, a no-argument callable that raises (a ``ValueError``
naming what to install) when an optional package is missing; ``get_reward`` calls it, so the run
stops at its config check instead of scoring every response 0 through the error handling below.

A user function is named ``module:function`` (importable) or ``path/to/file.py:function``, in the
config's ``rewards`` list beside the built-in names.

Departure from the official code, on purpose: a reward that raises, returns anything but a real
number (``bool`` and strings such as ``"0.75"`` included) or returns NaN/inf for one response scores
that response 0 for that function and records the error (with the response and the sample's source)
in ``RewardResult.errors``, instead of killing a run hours in. Reward code runs on a worker thread
with a per-call time limit (``timeout_s``, the config's ``reward_timeout``): a call that takes longer
scores 0 and is recorded the same way, and the thread it hangs in is abandoned (a daemon thread, so
it cannot keep the process alive).

A hang costs a step one time limit per function, not one per response: once a function has timed
out in a step (one scorer call), its remaining calls of that step are not started; they score 0 and
are recorded as skipped. A function that timed out before returning anything in a step is listed in
``RewardResult.hung``; the loop stops the run (or drops the function, ``--drop-hung-rewards``) when
that happens ``--reward-hang-steps`` steps in a row (cppo.rl.loop). Calls run one after another on
purpose: reward code is Python, so concurrent calls would share one core and a slow but healthy
function would time out. ``SystemExit`` and ``KeyboardInterrupt`` raised by reward code
are reward errors too, not exits: the trainer's own signals are handled on the main thread. Being
off the main thread, reward code cannot install signal handlers (SIGALRM timeouts of its own); the
built-in graders skip theirs there, the per-call limit standing in for them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import queue
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cppo.grading import grade, require_mathruler
from cppo.registry import Registry

REWARDS = Registry("reward")
register_reward = REWARDS.register
RewardFn = Callable[[str, str, dict], float]


@register_reward("accuracy")
def accuracy_reward(response: str, answer: str, sample: dict) -> float:
    return grade(response, answer)[0]


@register_reward("accuracy_mathruler")
def accuracy_mathruler_reward(response: str, answer: str, sample: dict) -> float:
    """The official code's grader (mathruler), as verl/EasyR1 score ``accuracy``; needs cppo[grading]."""
    return grade(response, answer, grader="mathruler")[0]


accuracy_mathruler_reward.requires = require_mathruler


@register_reward("format")
def format_reward(response: str, answer: str, sample: dict) -> float:
    return grade(response, answer)[1]


def get_reward(spec: str) -> RewardFn:
    """A registered name, or a user function as ``module:function`` / ``path.py:function``."""
    if ":" not in spec or spec in REWARDS:
        if spec not in REWARDS:
            raise ValueError(
                f"unknown reward {spec!r}; valid: {', '.join(REWARDS.names())}, or a user function as "
                "module:function or path/to/file.py:function"
            )
        fn = REWARDS.get(spec)
        requires = getattr(fn, "requires", None)
        if requires is not None:
            requires()
        return fn
    return load_user_function(spec)


def load_user_function(spec: str) -> RewardFn:
    """Import ``module:function`` or ``path.py:function`` (``rsplit``, so ``C:\\x.py:f`` works)."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(f"reward {spec!r}: expected module:function or path/to/file.py:function")
    if target.endswith(".py") or Path(target).is_file():
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"reward {spec!r}: file {path} does not exist")
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        module_name = f"cppo_user_reward_{path.stem}_{digest}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling inside the file need it
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"reward {spec!r}: cannot import module {target!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {target} has no function {name!r}")
    return fn


def reward_name(spec: str) -> str:
    """The metric name of a reward: the registry name, or the user function's own name."""
    return spec.rpartition(":")[2] if ":" in spec and spec not in REWARDS else spec


@dataclass
class RewardResult:
    """Scores of N responses: the weighted ``total`` and each function's unweighted ``components``."""

    total: list[float]
    components: dict[str, list[float]]
    errors: list[dict] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)  # functions that timed out before returning anything

    def metrics(self) -> dict[str, float]:
        """Means for one log line: ``reward/total``, ``reward/<name>`` and ``reward/errors``."""
        out = {"reward/total": _mean(self.total)}
        out.update({f"reward/{name}": _mean(values) for name, values in self.components.items()})
        out["reward/errors"] = float(len(self.errors))
        for name in self.components:  # summed over processes: > 0 when it hung on any of them
            out[f"reward/hung/{name}"] = float(name in self.hung)
        return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(1, len(xs))


class _RewardThread:
    """One daemon thread that runs reward calls in order, so a call can be given up after a limit."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._serve, name="cppo-reward", daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, args, box = self._jobs.get()
            try:
                box.put((True, fn(*args)))
            except BaseException as e:  # SystemExit and KeyboardInterrupt from reward code included
                box.put((False, e))

    def call(self, fn, args: tuple, timeout_s: float | None):
        """fn(*args), or TimeoutError after `timeout_s` (the thread is then stuck: use a new one)."""
        box: queue.Queue = queue.Queue(maxsize=1)
        self._jobs.put((fn, args, box))
        try:
            ok, value = box.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"took longer than {timeout_s:g} s (reward_timeout)") from None
        if not ok:
            raise _RewardRaised(value)
        return value


class _RewardRaised(Exception):
    """Carries what reward code raised (a BaseException, possibly) back to the scoring thread."""

    def __init__(self, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")


def as_reward_value(value) -> float:
    """A reward's return value as a finite float; ValueError for anything but a finite real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"returned {type(value).__name__} {value!r}, not a real number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"returned {value}")
    return value


class RewardScorer:
    """``scorer(responses, answers, samples) -> RewardResult`` with one weight per function.

    Every call runs on a worker thread with a limit of `timeout_s` seconds (None or 0: no limit)."""

    def __init__(self, specs: list[str], weights: list[float], timeout_s: float | None = 60.0):
        if len(specs) != len(weights):
            raise ValueError(
                f"{len(specs)} reward functions but {len(weights)} weights: give one weight each"
            )
        self.names = [reward_name(s) for s in specs]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"reward names must be distinct, got {self.names}")
        self.specs = list(specs)
        self.fns = [get_reward(s) for s in specs]
        self.weights = [float(w) for w in weights]
        self.timeout_s = timeout_s or None
        self.dropped: set[str] = set()  # functions no longer called (`drop`): they score 0
        self._thread = _RewardThread()

    def drop(self, name: str) -> None:
        """Stop calling function `name`: from now on it scores 0 (its weight stays in the total)."""
        self.dropped.add(name)

    def where(self, name: str) -> str:
        """Where function `name` is defined (file and line), for the messages that name it."""
        fn = self.fns[self.names.index(name)]
        code = getattr(fn, "__code__", None)
        if code is None:
            return self.specs[self.names.index(name)]
        return f"{code.co_filename}:{code.co_firstlineno}"

    def __call__(self, responses: list[str], answers: list[str], samples: list[dict]) -> RewardResult:
        if not len(responses) == len(answers) == len(samples):
            raise ValueError(f"{len(responses)} responses, {len(answers)} answers, {len(samples)} samples")
        components: dict[str, list[float]] = {name: [] for name in self.names}
        errors: list[dict] = []
        timed_out: set[str] = set()  # functions that timed out in this call: not started again
        returned: set[str] = set()  # functions that returned a value (even a bad one) in this call
        for i, (response, answer, sample) in enumerate(zip(responses, answers, samples)):
            for name, fn in zip(self.names, self.fns):
                if name in self.dropped:
                    score = 0.0
                elif name in timed_out:
                    score = _record(errors, name, i, sample, answer, response, self._skipped(name))
                else:
                    score, outcome = self._score(name, fn, i, response, answer, sample, errors)
                    (timed_out if outcome == "timeout" else returned).add(name)
                components[name].append(score)
        total = [
            sum(w * components[name][i] for name, w in zip(self.names, self.weights))
            for i in range(len(responses))
        ]
        return RewardResult(total, components, errors, hung=sorted(timed_out - returned))

    def _skipped(self, name: str) -> str:
        return (
            f"not run: {name} timed out earlier in this step (reward_timeout {self.timeout_s:g} s), so its "
            "other calls of the step score 0"
        )

    def _score(self, name, fn, i, response, answer, sample, errors) -> tuple[float, str]:
        """(score, "ok" | "error" | "timeout") of one call; an error or a timeout scores 0 and is logged."""
        try:
            return as_reward_value(self._thread.call(fn, (response, answer, sample), self.timeout_s)), "ok"
        except (TimeoutError, _RewardRaised, ValueError) as e:  # scores 0 and is logged, the run goes on
            if isinstance(e, TimeoutError):
                self._thread = _RewardThread()  # the old one is stuck in the call it gave up on
            text = str(e) if isinstance(e, _RewardRaised) else f"{type(e).__name__}: {e}"
            _record(errors, name, i, sample, answer, response, text)
            return 0.0, "timeout" if isinstance(e, TimeoutError) else "error"


def _record(
    errors: list[dict], name: str, i: int, sample: dict, answer: str, response: str, text: str
) -> float:
    """Append one reward error (reward_errors.jsonl's row, before the loop adds the question); 0.0."""
    errors.append(
        {
            "reward": name,
            "index": i,
            "error": text,
            "source": sample.get("source", ""),
            "answer": answer,
            "response": response[-500:],
        }
    )
    return 0.0


class RewardHungError(RuntimeError):
    """A reward function hung (timed out before returning anything) `reward_hang_steps` steps in a row."""


class HangWatch:
    """Counts, per reward function, the steps in a row in which it hung on any process
    (`reward/hung/<name>` of the step's metrics, the same on every rank)."""

    def __init__(self, names: list[str], steps: int):
        self.steps = steps  # 0: never report
        self.streaks = dict.fromkeys(names, 0)

    def update(self, metrics: dict[str, float]) -> list[str]:
        """The functions that have now hung `steps` steps in a row."""
        for name in self.streaks:
            hung = metrics.get(f"reward/hung/{name}", 0.0) > 0
            self.streaks[name] = self.streaks[name] + 1 if hung else 0
        return [name for name, n in self.streaks.items() if self.steps and n >= self.steps]


def hung_reward_message(scorer: RewardScorer, name: str, steps: int) -> str:
    """The one line that stops a run whose reward function `name` hung `steps` steps in a row."""
    return (
        f"reward function {name} ({scorer.where(name)}) timed out (--reward-timeout {scorer.timeout_s:g} s) "
        f"before returning anything in {steps} step(s) in a row; each of its calls scored 0: fix it (or "
        "make it faster and raise --reward-timeout), then --resume auto; or add --drop-hung-rewards to "
        "go on without it (it then scores 0)"
    )
