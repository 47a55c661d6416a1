"""The seven benchmarks of the paper's table: each one's prompt, how a prediction is graded, its metric.

Names are VLMEvalKit's dataset names, which are also the names of its TSV files (``~/LMUData/WeMath.tsv``).
For each, facts read from open-compass/VLMEvalKit (``vlmeval/dataset/image_vqa.py``,
``image_mcq.py``, ``dynamath.py``, ``utils/*.py``):

- LogicVista: the ``question`` cell. The chosen letters ("A, C") against ``answer``; VLMEvalKit always
  asks the judge, here only when the prediction is not letters. Metric: acc.
- MathVista_MINI: ``question``. multi_choice: the option named (from ``choices``) = ``answer_option``;
  else ``int``/``float`` equality by ``answer_type`` (text and list answers never count: VLMEvalKit
  compares ``str(None)`` with the answer). Metric: acc.
- WeMath: Hint / Question / Options lines. The option named (columns A, B, ...) = ``answer``.
  Metric: Score (Strict).
- DynaMath: the question, then DynaMath's JSON-answer guide. By ``answer_type``: a float within
  0.001 (π allowed), one letter A-E, free form as a substring of ``answer``. Metric: Overall (Average).
- MathVerse_MINI: ``question``. The same text as ``answer``, else this project's math grader (letters
  for multi-choice), else the judge. Metric: Overall.
- MathVision_MINI: ``question``. With ``choices``: the option named = ``answer``; else the same text,
  the same number, or the math grader. Metric: acc.
- MMMU_Pro_V: "Answer the following multiple-choice question in the image. ..." (the question is in
  the picture). The option named = ``answer`` (an open question becomes A = answer, B = "Other
  Answers"). Metric: acc.

The metrics are ``cppo.benchmarks.metrics``; the rules ``cppo.benchmarks.matching``; DynaMath's
prompt and parsing ``cppo.benchmarks.dynamath``. The prompt
texts of WeMath, DynaMath and MMMU_Pro_V are the benchmarks' own (VLMEvalKit's ``build_prompt``),
reproduced because the numbers depend on them. The protocol (``cppo.benchmarks.protocol``) appends
the think/boxed instruction to every prompt, as the official evaluation does.

A ``Verdict`` says who decided: ``rule`` (the local rule, no judge needed), ``judge``, or
``unresolved`` (the rule failed and there was no judge, or the judge failed): counted as wrong, as
VLMEvalKit counts an answer it cannot match (its MCQ matcher then draws a random option; that
coin is not thrown here).
"""

from __future__ import annotations

import ast
import string
from collections.abc import Callable
from dataclasses import dataclass

from cppo.benchmarks import metrics
from cppo.benchmarks.dynamath import dynamath_grade, dynamath_prompt
from cppo.benchmarks.judge import ChatJudge
from cppo.benchmarks.matching import UNRESOLVED, Verdict, answer_letters, chosen_letters, infer_option, number
from cppo.benchmarks.tsv import TsvError, TsvRow
from cppo.grading import answers_match
from cppo.registry import Registry

PAPER_BENCHMARKS = (
    "LogicVista",
    "MathVista_MINI",
    "WeMath",
    "DynaMath",
    "MathVerse_MINI",
    "MathVision_MINI",
    "MMMU_Pro_V",
)


@dataclass(frozen=True)
class Benchmark:
    name: str
    metric: str  # the column of VLMEvalKit's score table the paper's table reads
    columns: tuple[str, ...]  # required in the TSV besides index and a picture
    prompt: Callable[[TsvRow], str]
    grade: Callable[[TsvRow, str, ChatJudge | None], Verdict]
    score: Callable[[list[TsvRow], list[bool]], dict]


BENCHMARKS = Registry("benchmark")
get_benchmark = BENCHMARKS.get


def _question(row: TsvRow) -> str:
    return row.get("question", "")


def _options(row: TsvRow) -> dict[str, str]:
    """The option columns A, B, ... that hold text."""
    return {c: row.fields[c] for c in string.ascii_uppercase if row.get(c) is not None}


def _choices(row: TsvRow) -> dict[str, str]:
    """A ``choices`` cell (a Python list literal) as options A, B, ...; {} for none."""
    cell = row.get("choices")
    if cell is None:
        return {}
    try:
        items = ast.literal_eval(cell)
    except (ValueError, SyntaxError):
        raise TsvError(f"{row.where}: column 'choices' is not a list literal such as ['3', '4']") from None
    if not isinstance(items, (list, tuple)):
        raise TsvError(f"{row.where}: column 'choices' is not a list literal such as ['3', '4']")
    return {string.ascii_uppercase[i]: str(v) for i, v in enumerate(items)}


def _pick(
    row: TsvRow, prediction: str, options: dict[str, str], truth: str, judge: ChatJudge | None
) -> Verdict:
    """The option rule, then the judge's pick: VLMEvalKit's MCQ matching (``extract_answer_from_item``)."""
    letter = infer_option(prediction, options)
    if letter:
        return Verdict(letter == truth, "rule")
    if judge is not None:
        letter = judge.pick_option(_question(row), options, prediction)
        if letter is not None:
            return Verdict(letter == truth, "judge")
    return UNRESOLVED


def _register(benchmark: Benchmark) -> Benchmark:
    return BENCHMARKS.register(benchmark.name)(benchmark)


# ---------------------------------------------------------------- LogicVista


def _logicvista(row: TsvRow, prediction: str, judge: ChatJudge | None) -> Verdict:
    truth = answer_letters(row.get("answer", ""))
    mine = chosen_letters(prediction)
    if mine is not None:
        return Verdict(mine == truth, "rule")
    if judge is not None:
        got = judge.pick_letters(_question(row), prediction)
        if got is not None:
            return Verdict(got == truth, "judge")
    return UNRESOLVED


_register(Benchmark("LogicVista", "acc", ("question", "answer"), _question, _logicvista, metrics.accuracy))


# ---------------------------------------------------------------- MathVista_MINI


def _mathvista_value(text: str, row: TsvRow) -> bool | None:
    """VLMEvalKit's free-form check: int/float equality by answer_type; None when ``text`` does not parse."""
    kind, truth = row.get("answer_type"), row.get("answer", "")
    cast = {"integer": int, "float": float}.get(kind)
    if cast is None:
        return False  # text and list answers: VLMEvalKit compares str(None), so they never count
    try:
        return cast(text) == cast(truth)
    except ValueError:
        return None


def _mathvista(row: TsvRow, prediction: str, judge: ChatJudge | None) -> Verdict:
    if row.get("question_type") == "multi_choice":
        options, truth = _choices(row), row.get("answer_option")
        if not options or truth is None:
            raise TsvError(f"{row.where}: a multi_choice row needs 'choices' and 'answer_option'")
        letter = infer_option(prediction, options)
        if letter:
            return Verdict(letter == truth, "rule")
        extracted = judge.extract(_question(row), prediction) if judge is not None else None
        if extracted is None:
            return UNRESOLVED
        return Verdict(infer_option(extracted, options) == truth, "judge")
    local = _mathvista_value(prediction, row)
    if local:
        return Verdict(True, "rule")
    extracted = judge.extract(_question(row), prediction) if judge is not None else None
    if extracted is not None:
        return Verdict(bool(_mathvista_value(extracted, row)), "judge")
    return Verdict(False, "rule" if local is not None else "unresolved")


_register(
    Benchmark(
        "MathVista_MINI",
        "acc",
        ("question", "answer", "question_type", "answer_type"),
        _question,
        _mathvista,
        metrics.accuracy,
    )
)


# ---------------------------------------------------------------- MathVision_MINI


def same_value(prediction: str, truth: str) -> bool:
    """MathVision's free-form equality: the same text, numbers within 1e-6, or (VLMEvalKit: latex2sympy;
    here) this project's math grader (``cppo.grading.answers_match``, math-verify underneath)."""
    p, t = str(prediction).strip().lower(), str(truth).strip().lower()
    if p == t:
        return True
    pn, tn = number(p), number(t)
    if pn is not None and tn is not None:
        return abs(float(pn) - float(tn)) < 1e-6
    return answers_match(prediction, truth)


def _mathvision(row: TsvRow, prediction: str, judge: ChatJudge | None) -> Verdict:
    truth = row.get("answer", "")
    options = _choices(row)
    check = (
        (lambda text: (infer_option(text, options) or "").lower() == truth.strip().lower())
        if options
        else (lambda text: same_value(text, truth))
    )
    if options and infer_option(prediction, options):
        return Verdict(check(prediction), "rule")
    if not options and check(prediction):
        return Verdict(True, "rule")
    extracted = judge.extract(_question(row), prediction) if judge is not None else None
    if extracted is not None:
        return Verdict(check(extracted), "judge")
    return Verdict(False, "rule") if not options else UNRESOLVED


_register(
    Benchmark("MathVision_MINI", "acc", ("question", "answer"), _question, _mathvision, metrics.accuracy)
)


# ---------------------------------------------------------------- MathVerse_MINI


def _mathverse(row: TsvRow, prediction: str, judge: ChatJudge | None) -> Verdict:
    truth = row.get("answer", "").strip()
    if prediction.strip() == truth:
        return Verdict(True, "rule")
    if metrics.metadata(row).get("question_type") == "multi-choice":
        local = chosen_letters(prediction) == truth.lower()
    else:
        local = answers_match(prediction, truth)
    if local:
        return Verdict(True, "rule")
    if judge is None:
        return Verdict(False, "rule")
    agreed = judge.agrees(row.get("question_for_eval") or _question(row), truth, prediction)
    return UNRESOLVED if agreed is None else Verdict(agreed, "judge")


_register(
    Benchmark(
        "MathVerse_MINI", "Overall", ("question", "answer"), _question, _mathverse, metrics.mathverse_overall
    )
)


# ---------------------------------------------------------------- WeMath


def _wemath_prompt(row: TsvRow) -> str:
    text = f"Hint: {row.get('hint')}\n" if row.get("hint") is not None else ""
    text += f"Question: {_question(row)}\n"
    options = _options(row)
    if options:
        text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
    return text


def _wemath(row: TsvRow, prediction: str, judge: ChatJudge | None) -> Verdict:
    return _pick(row, prediction, _options(row), row.get("answer", "").strip(), judge)


_register(
    Benchmark(
        "WeMath",
        "Score (Strict)",
        ("question", "answer", "key"),
        _wemath_prompt,
        _wemath,
        metrics.wemath_strict,
    )
)


_register(
    Benchmark(
        "DynaMath",
        "Overall",
        ("question", "answer", "answer_type", "qid"),
        dynamath_prompt,
        dynamath_grade,
        metrics.dynamath_overall,
    )
)


# ---------------------------------------------------------------- MMMU_Pro_V

MMMU_PRO_V_PROMPT = (
    "Answer the following multiple-choice question in the image. "
    "Answer directly with the option letter from the given choices. "
)


def _mmmu_pro_v(row: TsvRow, prediction: str, judge: ChatJudge | None) -> Verdict:
    answer = row.get("answer", "").strip()
    options = _options(row)
    if "A" not in options:  # an open question: VLMEvalKit's MMMU_preproc makes it a two-way choice
        options = {**options, "A": answer, "B": "Other Answers"}
    truth = answer if len(answer) == 1 and answer in string.ascii_uppercase else "A"
    return _pick(row, prediction, options, truth, judge)


_register(
    Benchmark("MMMU_Pro_V", "acc", ("answer",), lambda row: MMMU_PRO_V_PROMPT, _mmmu_pro_v, metrics.accuracy)
)
