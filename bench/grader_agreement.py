"""How often the two accuracy graders agree, and which is right, on the corpus the tests hold.

    python bench/grader_agreement.py            # the table docs/rewards.md quotes, then every case where
                                                # a grader differs from the human verdict
    python bench/grader_agreement.py --update   # re-record each case's `mathverify` / `mathruler` verdict

The corpus (tests/data/grader_corpus.jsonl) is one JSON object a line: ``id``, ``category``, a full
``response``, the dataset's ``answer``, ``expected`` (a careful human's verdict: is the response's
final boxed answer the ground truth?), an optional ``note`` saying why, and the verdict each grader
gave when the corpus was last recorded. tests/test_grading.py checks that both graders still give
the recorded verdicts, so a change in either one (a new math-verify or mathruler release, an edit
of cppo.grading) fails there until it is re-recorded here with --update and docs/rewards.md is
brought up to date.

Graders (cppo.grading.GRADERS): ``mathverify`` is the ``accuracy`` reward (cppo.grading's rules,
then math-verify); ``mathruler`` is ``accuracy_mathruler``, the official code's grader. Needs
``pip install 'cppo[grading]'``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cppo.grading import GRADERS, grade

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "grader_corpus.jsonl"


def load_corpus(path: str | Path = CORPUS) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def grade_case(case: dict) -> dict[str, bool]:
    """Each grader's verdict on one case, as the accuracy reward would give it (1.0 -> True)."""
    return {g: grade(case["response"], case["answer"], grader=g)[0] == 1.0 for g in GRADERS}


def summarize(cases: list[dict]) -> dict:
    """Counts over the RECORDED verdicts: n, agree, right[grader], and the same per category."""

    def counts(rows: list[dict]) -> dict:
        return {
            "n": len(rows),
            "agree": sum(r["mathverify"] == r["mathruler"] for r in rows),
            "right": {g: sum(r[g] == r["expected"] for r in rows) for g in GRADERS},
        }

    categories = list(dict.fromkeys(c["category"] for c in cases))
    out = counts(cases)
    out["categories"] = {cat: counts([c for c in cases if c["category"] == cat]) for cat in categories}
    return out


def table(summary: dict) -> str:
    """A Markdown table: per category, how many cases, agreements, and each grader's right verdicts."""
    lines = [
        "| category | cases | graders agree | mathverify right | mathruler right |",
        "|---|---:|---:|---:|---:|",
    ]

    def row(name: str, c: dict) -> str:
        right = " | ".join(f"{c['right'][g]}" for g in GRADERS)
        return f"| {name} | {c['n']} | {c['agree']} | {right} |"

    lines += [row(cat, c) for cat, c in summary["categories"].items()]
    n = summary["n"]
    pct = {g: 100 * summary["right"][g] / n for g in GRADERS}
    lines.append(
        f"| **all** | **{n}** | **{summary['agree']} ({100 * summary['agree'] / n:.1f} %)** | "
        + " | ".join(f"**{summary['right'][g]} ({pct[g]:.1f} %)**" for g in GRADERS)
        + " |"
    )
    return "\n".join(lines)


def differences(cases: list[dict]) -> str:
    """The cases where a grader's recorded verdict is not the human's, one line each."""
    out = []
    for c in cases:
        wrong = [g for g in GRADERS if c[g] != c["expected"]]
        if wrong:
            at = c["response"].rfind("\\boxed")
            box = c["response"][at:] if at >= 0 else "(no box)"
            out.append(
                f"{c['id']:<13} truth {c['answer']!r:<22} {box[:38]!r:<42} "
                f"human {str(c['expected']):<5} wrong: {', '.join(wrong):<21} {c.get('note', '')}"
            )
    return "\n".join(out)


def update(path: Path) -> int:
    """Re-grade every case and write the verdicts back; returns how many changed."""
    cases = load_corpus(path)
    changed = 0
    for case in cases:
        new = grade_case(case)
        changed += any(case.get(g) != new[g] for g in GRADERS)
        case.update(new)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for case in cases:
            f.write(json.dumps(case, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--update", action="store_true", help="re-record both graders' verdicts")
    args = parser.parse_args(argv)
    if args.update:
        print(f"{update(args.corpus)} case(s) changed verdict; re-recorded {args.corpus}")
    cases = load_corpus(args.corpus)
    print(table(summarize(cases)))
    print("\ncases where a grader differs from the human verdict:")
    print(differences(cases))


if __name__ == "__main__":
    main()
