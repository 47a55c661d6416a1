"""The declarative rules of a config dataclass's fields, and the check that reads them.

A field's metadata may hold ``check``: a `Bound` its number must lie in, or a `Lookup` its name
must be found by (a registry's getter, whose ValueError lists the valid names). A ``Literal`` type
holds a field's fixed choices. `field_problems(obj)` returns one line per field that breaks its
rule; None passes a Bound (a field that allows none means off, or decided later).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Bound:
    """The range a number must lie in, and what its message adds: ``noun`` before the range ("a
    number > 0"), ``note`` after it in brackets ("0 turns it off"). NaN and infinities are out."""

    low: float
    high: float = math.inf
    low_open: bool = False  # > low, else >= low
    high_open: bool = False  # < high, else <= high
    note: str = ""
    noun: str = ""

    def holds(self, value) -> bool:
        return math.isfinite(value) and (
            (value > self.low if self.low_open else value >= self.low)
            and (value < self.high if self.high_open else value <= self.high)
        )

    def problem(self, name: str, value) -> str | None:
        """None when `value` is None or in range, else the line naming `name`, the range and `value`."""
        if value is None or self.holds(value):
            return None
        if self.high == math.inf:
            rule = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            ends = "(" if self.low_open else "[", ")" if self.high_open else "]"
            rule = f"in {ends[0]}{self.low:g}, {self.high:g}{ends[1]}"
        noun = f"{self.noun} " if self.noun else ""
        note = f" ({self.note})" if self.note else ""
        return f"{name} must be {noun}{rule}{note}, got {value}"


@dataclass(frozen=True)
class Lookup:
    """A name that `get` must accept: a registry's getter (user-registered names pass), a parser.
    Each name of a list is looked up; the first refused one is the problem."""

    get: Callable[[Any], Any]

    def problem(self, name: str, value) -> str | None:
        for item in value if isinstance(value, list) else [value]:
            try:
                self.get(item)
            except ValueError as e:  # the getter's message lists the valid names
                return f"{name}: {e}"
        return None


def at_least(low: float, note: str = "") -> Bound:
    return Bound(low, note=note)


def above(low: float, note: str = "", noun: str = "") -> Bound:
    return Bound(low, low_open=True, note=note, noun=noun)


def field_problems(obj) -> list[str]:
    """One line per field of the dataclass `obj` whose value breaks its check or is not one of its
    Literal's choices ("unknown dtype 'x'; valid: ...")."""
    hints = _hints(type(obj))
    problems = []
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if (bound := f.metadata.get("check")) and (problem := bound.problem(f.name, value)):
            problems.append(problem)
        if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
            problems.append(f"unknown {f.name} {value!r}; valid: {', '.join(typing.get_args(hint))}")
    return problems


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def batch_problems(prompts: int, group: int, mini: int | None, micro: int) -> list[str]:
    """What is wrong with B prompts x G rollouts in mini-batches (None: all N rollouts) of
    micro-batches: a group of one, or sizes that do not divide."""
    errors = []
    if group < 2:
        errors.append(
            f"group_size {group} leaves one rollout per prompt, so every GRPO advantage is 0: use "
            "--group-size 2 or more"
        )
    n = prompts * group
    mini = mini if mini is not None else n
    if min(n, mini, micro) < 1:  # the fields' bounds said so
        return errors
    if n % mini:
        errors.append(
            f"batch of {n} rollouts ({prompts} prompts x group size {group}) is not divisible by "
            f"mini_batch_size {mini}: use one of {_divisors(n)}"
        )
    elif mini % micro:
        errors.append(
            f"mini-batch of {mini} rollouts is not divisible by micro_batch_size {micro}: "
            f"use one of {_divisors(mini)}"
        )
    return errors


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
