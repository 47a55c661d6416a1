"""From a response to a benchmark's prediction, and from a prediction to the option it names.

These are the local steps of the official evaluation (the CPPO authors' VLMEvalKit fork, vbdi/cppo
``eval-VLMEvalKit/``): the response is cut to its last ``\\boxed{}`` (``boxed_prediction``), then each
benchmark's metric reads an option letter or a value from that prediction; only when that fails does
VLMEvalKit ask its LLM judge. Written from the behaviour those files define, not copied:

- ``boxed_prediction``: ``post_process=True`` of ``Qwen2VLChat_GRPO`` (``vlmeval/vlm/qwen2_vl/model.py``);
- ``infer_option``: VLMEvalKit's ``can_infer`` (``vlmeval/utils/matching_util.py``): a choice letter
  that stands alone among the words near the end, else the one option whose text the prediction
  contains;
- ``chosen_letters``: the letters of a prediction that is only letters (LogicVista's answers can be
  several letters, "A, C").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Verdict:
    """One prediction graded: right or not, and who decided: ``rule`` (the local rule settled it),
    ``judge``, or ``unresolved`` (the rule failed and no judge answered: counted wrong)."""

    correct: bool
    by: str


UNRESOLVED = Verdict(False, "unresolved")

_PUNCTUATION = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_LETTER_LIST = re.compile(r"\(?[A-Z]\)?(?:\s*(?:,|;|&|and|\s)\s*\(?[A-Z]\)?)*")
_LETTER_RUN = re.compile(r"[A-E]{2,5}")
_LETTER_THEN_TEXT = re.compile(r"\(?([A-Z])\)?[.:)]\s*\S.*", re.DOTALL)


def boxed_prediction(response: str) -> str:
    """The text after the response's last ``\\boxed{`` up to its matching ``}``.

    As the official post-processing does it: a box that is never closed keeps the rest of the
    response; a response without a box is kept, cut at its first unmatched ``}`` (if any).
    """
    tail = response.split("\\boxed{")[-1]
    if not tail:  # the response ends with "\boxed{": the official code keeps it whole
        return response
    depth = 1
    for i, ch in enumerate(tail):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return tail[:i]
    return tail


def infer_option(prediction: str, options: dict[str, str]) -> str | None:
    """The option letter a prediction names, or None when it names none (or several).

    1. Punctuation ``.()[],:;!*#{}`` becomes spaces; if exactly one of the option letters is a word
       of the prediction and it is among the last four words, that letter.
    2. No option letter but a word ``Z`` (VLMEvalKit's "none of them"): ``"Z"``, which matches no answer.
    3. Else, if the prediction is at most twice as long as all the options' texts together, the one
       option whose text (lower-cased) it contains.
    """
    text = str(prediction)
    words = text.translate(_PUNCTUATION).split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1:
        if words.index(named[0]) > len(words) - 5:
            return named[0]
    elif not named and "Z" in words:
        return "Z"
    lowered = text.lower()
    if len(lowered) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    contained = [letter for letter, value in options.items() if str(value).lower() in lowered]
    return contained[0] if len(contained) == 1 else None


def chosen_letters(prediction: str) -> str | None:
    """The letters a prediction chooses, sorted and lower-cased ("C, A" -> "ac"), or None when it is not
    a choice: a list of capital letters ("B", "(B)", "A, C", "A and C"), a run of the letters A-E
    ("AC", as LogicVista's judge writes several), or one letter and its option text ("B. a cat")."""
    text = _TEXT_CMD.sub(r"\1", str(prediction)).strip().strip("$").strip().rstrip(".").strip()
    if _LETTER_LIST.fullmatch(text) or _LETTER_RUN.fullmatch(text):
        return "".join(sorted({c.lower() for c in re.findall(r"[A-Z]", text)}))
    m = _LETTER_THEN_TEXT.fullmatch(text)
    return m.group(1).lower() if m else None


def answer_letters(answer: str) -> str:
    """A LogicVista answer ("A, C") as ``chosen_letters`` writes a choice ("ac")."""
    return "".join(sorted({part.strip().lower() for part in answer.split(",") if part.strip()}))


def number(text: str) -> Fraction | None:
    """A plain number (integer, decimal, fraction a/b, thousands commas) as an exact fraction, else None."""
    t = str(text).strip().replace(",", "")
    try:
        if "/" in t:
            num, _, den = t.partition("/")
            return Fraction(num.strip()) / Fraction(den.strip())
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None
