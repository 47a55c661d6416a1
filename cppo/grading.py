"""Answer extraction and grading shared by the rewards, the evaluation and the model card.

docs/method.md §4: accuracy grades the content of the LAST ``\\boxed{...}`` against the ground truth
with math-aware equivalence; format is ``<think>.*</think>.*\\boxed{.*}.*`` with dot matching
newline. Equivalence is tried in this order, cheapest first:

1. normalised text (case, surrounding ``$``, ``\\text{}``, trailing punctuation, spaces): words
   such as colours, and yes/no;
2. option letters: ``B``, ``(B)``, ``B.`` and ``B) text`` all read as ``b``;
3. numbers and fractions: ``0.5`` = ``1/2`` = ``\\frac{1}{2}``, ``1,000`` = ``1000``;
4. math-verify (a maintained grader of LaTeX and expressions) when it is installed.

That is the ``mathverify`` grader, this project's default (TRL's ``accuracy_reward`` also grades
with math-verify). The ``mathruler`` grader is the official code's: mathruler's
``extract_boxed_content`` then ``grade_answer`` (OpenAI PRM800K's normalisation and a sympy
difference), as verl's geo3k reward and EasyR1's math reward call them. ``grade(..., grader=)``
chooses; docs/rewards.md measures where the two disagree. mathruler is an optional dependency
(``pip install 'cppo[grading]'``), imported only when that grader is first used.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction

FORMAT_RE = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
_OPTION_RE = re.compile(r"^\(?([A-Za-z])\)?(?:[.:)]\s*.*)?$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_WORDS_RE = re.compile(r"[a-z][a-z ]*")
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{(-?[0-9.]+)\}\{(-?[0-9.]+)\}$")
GRADERS = ("mathverify", "mathruler")
GRADE_TIMEOUT_S = 5  # per answer, main thread only (SIGALRM); an answer that takes longer is wrong


class MissingExtraError(ImportError, ValueError):
    """An optional package a grader needs is not installed (a ValueError too, so config checks list it)."""


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (balanced braces), or None when there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: the answer was cut off


def format_ok(response: str) -> bool:
    """docs/method.md §4's format check: think tags, then a boxed answer."""
    return FORMAT_RE.fullmatch(response.strip()) is not None


def normalize(answer: str) -> str:
    s = answer.strip()
    s = _TEXT_RE.sub(r"\1", s)
    s = s.strip("$ ").rstrip(".").strip()
    s = re.sub(r"\s+", " ", s)
    return s.lower()


def _as_number(s: str) -> Fraction | None:
    t = s.replace(",", "").replace(" ", "")
    m = _FRAC_RE.match(t)
    if m:
        try:
            value = Fraction(m.group(2)) / Fraction(m.group(3))
        except (ValueError, ZeroDivisionError):
            return None
        return -value if m.group(1) else value
    try:
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def _option_letter(s: str) -> str | None:
    m = _OPTION_RE.match(s)
    return m.group(1).lower() if m else None


def _math_verify_equal(predicted: str, truth: str) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    # math-verify's timeout uses SIGALRM, which only the main thread can receive.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${truth}$", parsing_timeout=timeout)
        pred = parse(f"${predicted}$", parsing_timeout=timeout)
        return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # the grader must never take a run down; an unparsable answer is wrong
        return False


def answers_match(predicted: str, truth: str) -> bool:
    """Whether an extracted answer equals the ground truth under the rules in the module docstring."""
    p, t = normalize(predicted), normalize(truth)
    if not p:
        return False
    if p == t:
        return True
    if len(t) == 1 and t.isalpha():
        return _option_letter(p) == t
    pn, tn = _as_number(p), _as_number(t)
    if pn is not None and tn is not None:
        return pn == tn
    if _WORDS_RE.fullmatch(p) and _WORDS_RE.fullmatch(t):
        return False  # two different plain words ("red", "blue"): nothing for a maths grader to add
    return _math_verify_equal(predicted, truth)


def require_mathruler():
    """mathruler's ``(extract_boxed_content, grade_answer)``, or a one-line error naming the extra."""
    try:
        from mathruler.grader import extract_boxed_content, grade_answer
    except ImportError as e:  # mathruler itself, or pylatexenc, which it imports without declaring it
        missing = (e.name or "mathruler").partition(".")[0]
        raise MissingExtraError(
            f"the mathruler grader needs the {missing} package: pip install 'cppo[grading]'"
        ) from None
    return extract_boxed_content, grade_answer


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the block after ``seconds``; no limit off the main thread or without SIGALRM."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"grading took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def mathruler_correct(response: str, truth: str) -> bool:
    """The official code's accuracy: ``grade_answer(extract_boxed_content(response), truth)``.

    Called as verl's geo3k reward and EasyR1's math reward call it, quirks included: the last box's
    content is stripped; a response with no complete box grades the string ``"None"``. One addition:
    a grading that raises, or runs over ``GRADE_TIMEOUT_S`` (sympy can stall), is wrong instead of
    ending or stalling the run.
    """
    extract_boxed_content, grade_answer = require_mathruler()
    try:
        with _time_limit(GRADE_TIMEOUT_S):
            return bool(grade_answer(extract_boxed_content(response), truth))
    except Exception:  # a timeout or a parser error: as for math-verify, the answer is wrong, the run goes on
        return False


def grade(response: str, truth: str, grader: str = "mathverify") -> tuple[float, float]:
    """(accuracy, format) of one response, each 0.0 or 1.0.

    ``grader`` is one of ``GRADERS``: ``mathverify`` (this module's rules on the last box, the
    default) or ``mathruler`` (the official code's grader; needs ``cppo[grading]``). Format is the
    same check for both.
    """
    if grader == "mathverify":
        boxed = last_boxed(response)
        correct = boxed is not None and answers_match(boxed, truth)
    elif grader == "mathruler":
        correct = mathruler_correct(response, truth)
    else:
        raise ValueError(f"unknown grader {grader!r}; valid: {', '.join(GRADERS)}")
    return 1.0 if correct else 0.0, 1.0 if format_ok(response) else 0.0
