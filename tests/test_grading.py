import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cppo.grading import answers_match, format_ok, grade, last_boxed
from cppo.prompt import INSTRUCTION, build_messages


@pytest.mark.parametrize(
    "text, expected",
    [
        ("x \\boxed{3} then \\boxed{4}", "4"),  # the LAST box counts
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("no box here", None),
        ("\\boxed{3", None),  # cut off mid-answer
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "pred, truth, same",
    [
        ("Red", "red", True),
        ("\\text{blue}", "blue", True),
        ("$3$", "3", True),
        ("3.", "3", True),
        ("0.5", "1/2", True),
        ("\\frac{1}{2}", "0.5", True),
        ("1,000", "1000", True),
        ("(B)", "B", True),
        ("B. a square", "B", True),
        ("C", "B", False),
        ("3", "4", False),
        ("red", "blue", False),
        ("", "3", False),
        ("\\sqrt{4}", "2", True),  # needs math-verify
        ("2x+x", "3x", True),
    ],
)
def test_answers_match(pred, truth, same):
    if "\\sqrt" in pred or "x" in pred:
        pytest.importorskip("math_verify")
    assert answers_match(pred, truth) is same


def test_format_and_grade():
    good = "<think>I see two red circles.</think> \\boxed{2}"
    assert format_ok(good)
    assert grade(good, "2") == (1.0, 1.0)
    assert grade(good, "3") == (0.0, 1.0)
    assert not format_ok("\\boxed{2}")  # no reasoning
    assert grade("\\boxed{2}", "2") == (1.0, 0.0)
    assert format_ok("<think>a\nb</think>\n\\boxed{x}\n")  # dot matches newline


def test_build_messages():
    msgs = build_messages("How many red shapes?", num_images=2)
    content = msgs[0]["content"]
    assert [c["type"] for c in content] == ["image", "image", "text"]
    assert content[-1]["text"].endswith(INSTRUCTION)
    with pytest.raises(ValueError, match="empty"):
        build_messages("  ")


# --- the official code's grader (mathruler) beside the default one, and their agreement


def test_grade_chooses_the_grader_and_names_the_valid_ones():
    pytest.importorskip("mathruler.grader")
    good = "<think>half</think> \\boxed{0.5}"
    assert grade(good, "\\frac{1}{2}", grader="mathruler") == (1.0, 1.0)
    assert grade(good, "\\frac{1}{3}", grader="mathruler") == (0.0, 1.0)
    with pytest.raises(ValueError, match="unknown grader 'sympy'; valid: mathverify, mathruler"):
        grade(good, "0.5", grader="sympy")


def test_mathruler_is_called_as_the_official_code_calls_it():
    """grade_answer(extract_boxed_content(response), truth), quirks kept: no box grades "None"."""
    pytest.importorskip("mathruler.grader")
    from mathruler.grader import extract_boxed_content, grade_answer

    from cppo.grading import mathruler_correct

    for response, truth in [
        ("<think>a</think> \\boxed{ 3 } then \\boxed{4}", "4"),
        ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}"),
        ("no box at all", "None"),
        ("\\boxed{4 \\text{ or } 5}", "4"),
    ]:
        assert mathruler_correct(response, truth) is grade_answer(extract_boxed_content(response), truth)


def test_a_stalled_or_raising_mathruler_grading_is_wrong_and_the_alarm_is_restored(monkeypatch):
    grader = pytest.importorskip("mathruler.grader")
    import signal
    import time

    from cppo import grading

    def stall(given, truth):
        time.sleep(3)
        return True

    def explode(given, truth):
        raise RecursionError("sympy")

    monkeypatch.setattr(grading, "GRADE_TIMEOUT_S", 0.2)
    before = signal.getsignal(signal.SIGALRM)
    for fake in (stall, explode):
        monkeypatch.setattr(grader, "grade_answer", fake)
        start = time.monotonic()
        assert grading.mathruler_correct("\\boxed{1}", "1") is False
        assert time.monotonic() - start < 2
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL)[0] == 0


@pytest.mark.parametrize("blocked", ["mathruler.grader", "pylatexenc"])
def test_a_missing_mathruler_says_which_extra_to_install(monkeypatch, blocked):
    from cppo.grading import MissingExtraError, require_mathruler

    monkeypatch.delitem(sys.modules, "mathruler.grader", raising=False)
    monkeypatch.setitem(sys.modules, blocked, None)  # import of a None entry raises ImportError
    with pytest.raises(MissingExtraError) as e:
        grade("\\boxed{1}", "1", grader="mathruler")
    package = blocked.partition(".")[0]
    assert str(e.value) == f"the mathruler grader needs the {package} package: pip install 'cppo[grading]'"
    assert isinstance(e.value, ImportError) and isinstance(e.value, ValueError)
    with pytest.raises(MissingExtraError):
        require_mathruler()


def test_importing_cppo_grading_and_rewards_imports_no_grader_package():
    code = (
        "import sys, cppo.grading, cppo.rl.rewards; "
        "print([m for m in ('mathruler', 'pylatexenc', 'math_verify', 'latex2sympy2_extended') "
        "if m in sys.modules])"  # not sympy: torch.distributed imports it for its own shape maths
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, "[]"), out.stderr[-2000:]


BENCH = Path(__file__).resolve().parent.parent / "bench" / "grader_agreement.py"
CORPUS = Path(__file__).resolve().parent / "data" / "grader_corpus.jsonl"
CASES = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def agreement():
    pytest.importorskip("math_verify")
    pytest.importorskip("mathruler.grader")
    spec = importlib.util.spec_from_file_location("grader_agreement", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_corpus_covers_what_docs_rewards_md_says_it_does():
    assert 80 <= len(CASES) <= 150
    assert len({c["id"] for c in CASES}) == len(CASES)
    for c in CASES:
        assert isinstance(c["expected"], bool) and isinstance(c["mathverify"], bool), c["id"]
        assert isinstance(c["mathruler"], bool) and c["response"] and c["answer"], c["id"]
    assert {c["category"] for c in CASES} == {
        "integer", "decimal", "fraction", "latex", "option", "unit", "degree", "percent",
        "word", "interval", "multi", "hedge", "missing", "nested",
    }  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_both_graders_give_their_recorded_verdict(agreement, case):
    """A grader that changes behaviour (a new release, an edit) fails here: look at the case, then
    re-record with `python bench/grader_agreement.py --update` and update docs/rewards.md."""
    got = agreement.grade_case(case)
    assert got == {"mathverify": case["mathverify"], "mathruler": case["mathruler"]}, case.get("note", "")


def test_agreement_and_accuracy_are_the_numbers_docs_rewards_md_quotes(agreement, capsys):
    s = agreement.summarize(CASES)
    assert (s["n"], s["agree"]) == (150, 126)  # 84.0 % agreement
    assert s["right"] == {"mathverify": 141, "mathruler": 123}  # against the human verdicts
    disagree = [c for c in CASES if c["mathverify"] != c["mathruler"]]
    assert len(disagree) == 24 and sum(c["mathverify"] == c["expected"] for c in disagree) == 21
    agreement.main(["--corpus", str(CORPUS)])
    out = capsys.readouterr().out
    assert "| **all** | **150** | **126 (84.0 %)** | **141 (94.0 %)** | **123 (82.0 %)** |" in out
    assert "hedge-03" in out  # the cases where a grader is wrong are listed
