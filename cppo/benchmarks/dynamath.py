"""DynaMath (open-compass/VLMEvalKit ``vlmeval/dataset/dynamath.py``): its prompt and its grading.

The prompt asks for a JSON reply with a "short answer" (its text is DynaMath's own, reproduced because
the numbers depend on it); the official evaluation appends the think/boxed instruction after it, so a
response usually holds both, and the boxed cut leaves whatever the box holds. Grading, by
``answer_type``: the JSON's "short answer" if the prediction is such JSON, else the prediction itself,
parsed as DynaMath's ``parse_answer`` does (float: the first word, "π" allowed; multiple choice: one
letter, or the one of A-E it contains; free form: as is); the judge reformats what does not parse.
A float is right within 0.001; a letter when equal; free form when the short answer is a substring of
the answer (so an empty one counts: DynaMath's rule, kept). An unparsed multiple-choice prediction is
right when the answer letter is among its first three characters (DynaMath's last resort).
"""

from __future__ import annotations

import json
import math

from cppo.benchmarks.judge import ChatJudge
from cppo.benchmarks.matching import Verdict
from cppo.benchmarks.tsv import TsvError, TsvRow

_DYNAMATH_INSTRUCTION = {  # the prompt's short-answer instruction per answer_type (sic: "corresponing")
    "multiple choice": "Provide the corresponing choice option in the 'short answer' key, "
    "such as 'A', 'B', 'C', or 'D'.",
    "float": "Format the answer as a three-digit floating-point number "
    "and provide it in the 'short answer' key.",
    "free form": "Float numbers in the answer should be formatted as three-digit floating-point numbers.",
}
_DYNAMATH_REFORMAT = {  # what the judge is told when the prediction does not parse
    "multiple choice": "Output the corresponing choice option, such as 'A', 'B', 'C', 'D', in a single line.",
    "float": "Output a three-digit floating-point number in a single line.",
    "free form": "Output a short answer in a single line. "
    "Any float numbers in the answer should be formatted as three-digit floating-point numbers.",
}
_DYNAMATH_GUIDE = (
    "\n## Answer Instruction Please provide an answer to the question outlined above. "
    "Your response should adhere to the following JSON format, which includes two keys: "
    "'solution' and 'short answer'. The 'solution' key can contain detailed steps needed to solve "
    "the question, and the 'short answer' key should provide a concise response. {INST}"
    "\n\nExample of expected JSON response format:\n\n"
)
_DYNAMATH_EXAMPLE = json.dumps(
    {"solution": "[Detailed step-by-step explanation]", "short answer": "[Concise Answer]"}, indent=4
)


def _answer_type(row: TsvRow) -> str:
    kind = row.get("answer_type")
    if kind not in _DYNAMATH_INSTRUCTION:
        raise TsvError(
            f"{row.where}: answer_type {kind!r}; DynaMath's are {', '.join(_DYNAMATH_INSTRUCTION)}"
        )
    return kind


def dynamath_prompt(row: TsvRow) -> str:
    guide = _DYNAMATH_GUIDE.format(INST=_DYNAMATH_INSTRUCTION[_answer_type(row)])
    return f"## Question\n {row.get('question', '')}{guide}{_DYNAMATH_EXAMPLE}"


def _dynamath_parse(text: str, kind: str) -> tuple[bool, str | float | None]:
    """DynaMath's ``parse_answer``: (parsed, short answer)."""
    if kind == "float":
        first = text if text.isdigit() else text.split(" ")[0]
        try:
            if "\u03c0" in first:  # "2π" -> 2·pi
                return True, float(first.split("\u03c0")[0]) * math.pi
            return True, float(first)
        except ValueError:
            return False, None
    if kind == "multiple choice":
        if len(text) == 1:
            return True, text.upper()
        present = [c for c in "ABCDE" if c in text.upper()]
        return (True, present[0]) if len(present) == 1 else (False, None)
    return True, text


def _dynamath_clean(prediction: str) -> str:
    """DynaMath's ``preprocess``: the outermost {...} span if any, backslashes removed."""
    text = str(prediction)
    if 0 <= text.find("{") < text.rfind("}"):
        text = text[text.find("{") : text.rfind("}") + 1]
    return text.replace("\\", "")


def dynamath_grade(row: TsvRow, prediction: str, judge: ChatJudge | None) -> Verdict:
    kind, truth = _answer_type(row), row.get("answer", "")
    text = _dynamath_clean(prediction)
    parsed, short, by = False, None, "rule"
    try:  # the JSON the prompt asks for
        reply = json.loads(text, strict=False)
        if isinstance(reply, dict) and reply.get("short answer") is not None:
            parsed, short = _dynamath_parse(str(reply["short answer"]), kind)
    except ValueError:
        pass
    if not parsed:
        parsed, short = _dynamath_parse(text, kind)
    if not parsed and judge is not None:
        reply = judge.short_answer(text, _DYNAMATH_REFORMAT[kind])
        if reply is not None:
            (parsed, short), by = _dynamath_parse(reply, kind), "judge"
    if kind == "float":
        try:
            return Verdict(
                parsed and abs(float(short) - float(truth)) <= 0.001, by if parsed else "unresolved"
            )
        except ValueError:
            raise TsvError(f"{row.where}: a float answer {truth!r} that is not a number") from None
    if kind == "multiple choice":
        if parsed:
            return Verdict(short == truth.strip(), by)
        return Verdict(truth.strip() in text[:3].upper(), "rule")  # DynaMath's last resort
    return Verdict(str(short).lower() in truth.lower(), by)  # free form: a substring of the answer
