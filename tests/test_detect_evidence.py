"""The token classes behind docs/detect.md's evidence table, on the task tokenizer's real cuts."""

from __future__ import annotations

import pytest

from cppo.detect.evidence import token_classes
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
