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
