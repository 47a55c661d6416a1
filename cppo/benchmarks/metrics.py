"""One run's score of a benchmark from its per-question verdicts: pure functions over rows and hits.

Every function takes the benchmark's rows and one bool per row (that row's prediction was right) and
returns ``{"score": percent, "parts": {name: percent}}``; ``score`` is the number the paper's table
shows for that benchmark, ``parts`` the breakdowns VLMEvalKit prints beside it. The definitions are
VLMEvalKit's (open-compass/VLMEvalKit), written from the code, with each departure named:

- ``accuracy``: the share of right rows (LogicVista, MathVista_MINI, MathVision_MINI, MMMU_Pro_V:
  the ``acc`` / ``Overall`` of their score tables).
- ``mathverse_overall``: the share of right rows over the whole file, and per ``problem_version``.
  Departure: VLMEvalKit's table (``vlmeval/dataset/utils/mathverse.py``, ``MathVerse_acc``) has one
  row per problem version and no all-items row; the official summary reads its row 0, which is the
  first version in a Python ``set``'s order (that order changes with the interpreter's string-hash
  seed). The all-items share is what "Overall" means, so it is the score here; the per-version
  shares are in ``parts``.
- ``dynamath_overall``: DynaMath's "Average" setting, the share of right rows over all variants
  (the summary reads row 0 of ``vlmeval/dataset/dynamath.py``'s table, the Average row), with the
  "Worst Case" setting in ``parts`` (a seed question ``qid`` counts only if all its variants are right).
- ``wemath_strict``: WeMath's "Score (Strict)" (``vlmeval/dataset/utils/wemath.py``): over the
  two- and three-step problems, each problem's sub-questions (``key`` ``2steps_1``, ``2steps_2``, ...)
  and its composite question (``2steps_multi``) sorted into insufficient knowledge IK (a step wrong,
  composite wrong), inadequate generalization IG (steps right, composite wrong), complete mastery
  CM (all right) and rote memorization RM (a step wrong, composite right);
  score = (n - 0.5·IG - RM - IK) / n = (CM + 0.5·IG) / n. VLMEvalKit fixes n = 525, the number of
  such problems in WeMath's file; here n is the number found, equal on the full file. "Score
  (Loose)" (RM only when every step is wrong) is in ``parts``.
"""

from __future__ import annotations

import ast
import json
import re
from collections import defaultdict

from cppo.benchmarks.tsv import TsvError, TsvRow


def _percent(hits: list[bool]) -> float:
    return 100.0 * sum(hits) / len(hits) if hits else 0.0


def accuracy(rows: list[TsvRow], hits: list[bool]) -> dict:
    return {"score": _percent(hits), "parts": {}}


def metadata(row: TsvRow) -> dict:
    """MathVerse's ``metadata`` cell (a dict literal, VLMEvalKit reads it as JSON after swapping quotes)."""
    cell = row.get("metadata")
    if cell is None:
        return {}
    for parse in (ast.literal_eval, lambda t: json.loads(t.replace("'", '"'))):
        try:
            value = parse(cell)
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, dict):
            return value
    raise TsvError(
        f"{row.where}: column 'metadata' is not a dict literal such as {{'problem_version': 'Text Lite'}}"
    )


def mathverse_overall(rows: list[TsvRow], hits: list[bool]) -> dict:
    versions: dict[str, list[bool]] = defaultdict(list)
    for row, hit in zip(rows, hits):
        versions[str(metadata(row).get("problem_version", "unknown"))].append(hit)
    return {"score": _percent(hits), "parts": {v: _percent(h) for v, h in sorted(versions.items())}}


def dynamath_overall(rows: list[TsvRow], hits: list[bool]) -> dict:
    by_seed: dict[str, bool] = {}
    for row, hit in zip(rows, hits):
        qid = row.get("qid")
        by_seed[qid] = by_seed.get(qid, True) and hit
    return {"score": _percent(hits), "parts": {"worst_case": _percent(list(by_seed.values()))}}


_STEP_KEY = re.compile(r"([23])steps_(\d|multi)")


def wemath_groups(rows: list[TsvRow], hits: list[bool]) -> list[tuple[list[bool], bool]]:
    """(steps right, composite right) of every two- and three-step problem, keyed by (steps, ID)."""
    found: dict[tuple[str, str], dict[str, bool]] = defaultdict(dict)
    for row, hit in zip(rows, hits):
        m = _STEP_KEY.fullmatch((row.get("key") or "").strip())
        if m:  # one-step questions are not part of the score
            problem = row.get("ID") or row.get("id")
            if problem is None:
                raise TsvError(
                    f"{row.where}: a {row.get('key')} row without an 'ID'; WeMath groups steps by ID"
                )
            found[(m.group(1), problem)][m.group(2)] = hit
    if not found:
        raise TsvError(
            "WeMath: no rows with key 2steps_*/3steps_*; Score (Strict) is over multi-step problems"
        )
    groups = []
    for (steps, problem), parts in sorted(found.items()):
        need = [str(i) for i in range(1, int(steps) + 1)] + ["multi"]
        missing = [f"{steps}steps_{k}" for k in need if k not in parts]
        if missing:
            raise TsvError(f"WeMath: problem ID {problem} lacks {', '.join(missing)}; the file is incomplete")
        groups.append(([parts[str(i)] for i in range(1, int(steps) + 1)], parts["multi"]))
    return groups


def wemath_strict(rows: list[TsvRow], hits: list[bool]) -> dict:
    groups = wemath_groups(rows, hits)
    n = len(groups)
    ig = sum(all(s) and not m for s, m in groups)
    ik = sum(not all(s) and not m for s, m in groups)
    rm_strict = sum(not all(s) and m for s, m in groups)
    rm_loose = sum(not any(s) and m for s, m in groups)
    cm = sum(all(s) and m for s, m in groups)
    return {
        "score": 100.0 * (n - 0.5 * ig - rm_strict - ik) / n,
        "parts": {
            "score_loose": 100.0 * (n - 0.5 * ig - rm_loose - ik) / n,
            "problems": float(n),
            "IK": float(ik),
            "IG": float(ig),
            "CM": float(cm),
            "RM_strict": float(rm_strict),
        },
    }
