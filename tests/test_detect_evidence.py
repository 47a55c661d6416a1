"""Answer-bearing tokens and the token classes behind docs/detect.md's evidence tables, on the task
tokenizer's real cuts; the per-selector re-measurement command end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from cppo.detect.evidence import answer_bearing, main, outcome, token_classes
from tests.helpers import tiny_model_and_processor


@pytest.fixture(scope="module")
def tok():
    return tiny_model_and_processor()[1].tokenizer


def _classes(tok, question, response):
    ids = tok(response, add_special_tokens=False)["input_ids"]
    texts = [tok.decode([i]) for i in ids]
    assert "".join(texts) == response
    return dict(zip(texts, token_classes(texts, question))), texts


def test_count_question_digit_is_visual_colour_is_echoed(tok):
    cls, texts = _classes(
        tok, "How many red shapes are there?", "<think>I see 2 red shapes.</think> \\boxed{2}"
    )
    assert cls[" red"] == ("echoed", "outside")
    digits = [c for t, c in zip(texts, token_classes(texts, "How many red shapes are there?")) if t == "2"]
    assert digits == [("visual", "outside"), ("visual", "boxed")]
    assert cls["<think"][0] == cls["boxed"][0] == "format"
    assert cls[" shapes"] == ("other", "outside")


def test_colour_question_answer_is_visual_inside_and_outside_the_box(tok):
    cls, _ = _classes(tok, "What color is the square?", "<think>The square is red.</think> \\boxed{red}")
    assert cls[" red"] == ("visual", "outside")
    assert cls["{red"] == ("visual", "boxed")  # the token overlaps the boxed content
    assert cls[" square"] == ("other", "outside")  # a shape word is not an answer word


def test_yes_no_answers_and_an_unclosed_box(tok):
    q = "Are there more red shapes than blue shapes?"
    cls, _ = _classes(tok, q, "<think>I see 1 red and 3 blue.</think> \\boxed{no")
    assert cls["{no"] == ("visual", "boxed")  # an unclosed box runs to the end of the text
    assert cls[" blue"] == ("echoed", "outside") and cls["3"] == ("visual", "outside")
    cls, _ = _classes(tok, q, "<think>more</think> yes")
    assert cls["yes"] == ("visual", "outside") and cls[">"] == ("format", "outside")


def _bearing(tok, response, truth=None):
    ids = tok(response, add_special_tokens=False)["input_ids"]
    texts = [tok.decode([i]) for i in ids]
    assert "".join(texts) == response
    return [t for t, b in zip(texts, answer_bearing(texts, truth)) if b]


def test_answer_bearing_is_the_box_and_the_reasoning_that_spells_the_answer(tok):
    r = "<think>I see 2 yellow shapes and 12 others.</think> \\boxed{2}"
    # the reasoning's "2" and the boxed one; not the "1" "2" of "12" (not a whole word), not "{"
    assert _bearing(tok, r) == ["2", "2"]
    assert _bearing(tok, r, truth="2") == ["2", "2"]
    # a wrong answer: the boxed "blue" and its mention; the truth "red" where the reasoning says it
    wrong = "<think>The square is blue, not red.</think> \\boxed{blue}"
    assert _bearing(tok, wrong) == [" blue", "{blue"]
    assert _bearing(tok, wrong, truth="Red") == [" blue", " red", "{blue"]
    assert _bearing(tok, "<think>no box here</think>") == []


def test_outcome_uses_the_project_grader():
    assert outcome("<think>x</think> \\boxed{1/2}", "0.5") == {
        "truth": "0.5",
        "answer": "1/2",
        "correct": True,  # cppo.grading's number equivalence, not a string compare
        "format": True,
    }
    assert outcome("\\boxed{3}", "2")["correct"] is False and outcome("\\boxed{3}", None)["correct"] is None


def test_per_selector_command_writes_every_selector(tmp_path, capsys):
    model, processor = tiny_model_and_processor(seed=1)
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    argv = ["--model", str(tmp_path / "m"), "--n", "3", "--draws", "2", "--max-new-tokens", "8"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 0
    doc = json.loads((tmp_path / "o" / "selectors.json").read_text())
    assert doc["examples"] == 3 and doc["settings"]["draws"] == 2 and doc["graded"] == 3
    assert set(doc["selectors"]) == {"relative", "raw", "kl_shift", "entropy"}  # KL computed too
    for r in doc["selectors"].values():
        assert 0 <= r["answer_bearing"] <= r["selected"]
        assert r["share"] == (r["answer_bearing"] / r["selected"] if r["selected"] else None)
    assert doc["selectors"]["relative"]["selected"] == doc["selected"]  # the detector's own choice
    md = (tmp_path / "o" / "selectors.md").read_text()
    assert md.count("| `") == 4 and md in capsys.readouterr().out
