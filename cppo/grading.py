"""Answer extraction and grading shared by the rewards, the evaluation and the model card.

docs/method.md §4: accuracy grades the content of the LAST ``\\boxed{...}`` against the ground truth
with math-aware equivalence; format is ``<think>.*</think>.*\\boxed{.*}.*`` with dot matching
newline. Equivalence is tried in this order, cheapest first:

1. normalised text (case, surrounding ``$``, ``\\text{}``, trailing punctuation, spaces): words
   such as colours, and yes/no;
2. option letters: ``B``, ``(B)``, ``B.`` and ``B) text`` all read as ``b``;
3. numbers and fractions: ``0.5`` = ``1/2`` = ``\\frac{1}{2}``, ``1,000`` = ``1000``;
4. math-verify (a maintained grader of LaTeX and expressions) when it is installed.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

FORMAT_RE = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
_OPTION_RE = re.compile(r"^\(?([A-Za-z])\)?(?:[.:)]\s*.*)?$")
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_WORDS_RE = re.compile(r"[a-z][a-z ]*")
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\{(-?[0-9.]+)\}\{(-?[0-9.]+)\}$")


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


def grade(response: str, truth: str) -> tuple[float, float]:
    """(accuracy, format) of one response, each 0.0 or 1.0."""
    boxed = last_boxed(response)
    accuracy = 1.0 if boxed is not None and answers_match(boxed, truth) else 0.0
    return accuracy, 1.0 if format_ok(response) else 0.0
