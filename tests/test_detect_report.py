"""What the report says, on detections built by hand (no model): the truth and the right/wrong
marker, the how-to-read line, whitespace drawn visibly, the near-zero warning, and the summary
across examples checked against a hand computation."""

from __future__ import annotations

import json
import re
from html import unescape

import pytest
import torch
from PIL import Image

from cppo.detect import Detection, Example
from cppo.detect.evidence import data_summary
from cppo.detect.report import report_html, terminal_summary, write_outputs

SETTINGS = {"model": "m", "preset": "paper", "removing": ["zoom_crop"], "selector": "raw", "draws": 3}


def make_detection(texts, shifts, selected, truth=None, entropy=1.0, index=0, kl=None) -> Detection:
    """A Detection with the given token texts, shifts (H(I) = `entropy` everywhere) and selection."""
    T = len(texts)
    shift = torch.tensor(shifts, dtype=torch.float32)  # (T,)
    h = torch.full((T,), float(entropy))  # (T,)
    sel = torch.zeros(T, dtype=torch.bool)
    sel[list(selected)] = True
    img = Image.new("RGB", (32, 32), "white")
    return Detection(
        index=index,
        example=Example([img], "How many?", "".join(texts), extra={} if truth is None else {"answer": truth}),
        token_ids=list(range(T)),
        token_texts=list(texts),
        response_mask=torch.ones(T, dtype=torch.bool),
        generated=False,
        entropy=h,
        perturbed_entropy=h + shift,
        shift=shift,
        shift_std=torch.zeros(T),
        draw_shifts=shift[None].repeat(3, 1),  # (K=3, T)
        kl=kl,
        score=shift.clamp(min=0),
        selected=sel,
        selector="raw",
        top_percent=0.5,
        views=[[{"name": "zoom_crop", "params": {"scale": 0.6}}]] * 3,
        perturbed_images=[[img]] * 3,
    )


# A: right, B: wrong, C: no truth and no box. Answer-bearing tokens (marked *):
#   A  <think> | I see | 2* | red | </think> | \boxed{ | 2* | }       truth 2: 2 of 8
#   B  <think> | it is | blue* | </think> | \boxed{ | blue* | }      truth red, boxed blue: 2 of 7
#   C  no | box | here                                             nothing: 0 of 3
A = (
    ["<think>", "I see ", "2", " red", "</think>", " \\boxed{", "2", "}"],
    [0, 0.1, 0.5, -0.2, 0, 0.3, 0.4, 0.05],
)
B = (["<think>", "it is", " blue", "</think>", " \\boxed{", "blue", "}"], [0, 0.2, -0.3, 0, 0.1, 0.6, 0.05])
C = (["no", " box", " here"], [0.3, -0.1, 0.0])


def _three():
    return [
        make_detection(*A, selected=[2, 5], truth="2", index=0),
        make_detection(*B, selected=[1, 5, 6], truth="red", index=1),
        make_detection(*C, selected=[0], index=2),
    ]


def test_data_summary_against_a_hand_computation():
    s = data_summary(_three())
    # accuracy over the two examples with a truth: A right, B wrong; format: A and B have it, C not
    assert (s["graded"], s["correct"], s["accuracy"]) == (2, 1, 0.5)
    assert s["format"] == pytest.approx(2 / 3)
    # 18 response tokens, 4 answer-bearing (A: 2, B: 2, C: 0)
    assert (s["tokens"], s["answer_bearing"]) == (18, 4)
    assert s["base_rate"] == pytest.approx(4 / 18)
    # selected by hand: A {2*, 5}, B {1, 5*, 6}, C {0}: 2 of 6 answer-bearing
    assert (s["selected"], s["selected_answer_bearing"]) == (6, 2)
    assert s["share"] == pytest.approx(1 / 3)
    assert s["enrichment"] == pytest.approx((1 / 3) / (4 / 18))  # 1.5
    # raw at rho 0.5, from the shifts: A candidates 5 -> k=2 {2*, 6*}; B 4 -> k=2 {5*, 1};
    # C 1 -> k=1 {0}: 3 of 5
    raw = s["selectors"]["raw"]
    assert (raw["selected"], raw["answer_bearing"]) == (5, 3)
    assert raw["enrichment"] == pytest.approx(0.6 / (4 / 18))  # 2.7
    # relative with H(I) constant ranks as raw does
    assert s["selectors"]["relative"] == raw
    # entropy: every H(I) ties, so every token is selected: the share is the base rate
    ent = s["selectors"]["entropy"]
    assert (ent["selected"], ent["answer_bearing"], ent["enrichment"]) == (18, 4, pytest.approx(1.0))
    assert "kl_shift" not in s["selectors"]  # no KL in these detections


def test_report_shows_truth_marker_how_to_read_and_summary():
    html = report_html(_three(), SETTINGS)
    assert "How to read this:" in html
    assert "Positive (red) = the token becomes less certain without the image" in html
    assert "Negative (blue) = the token becomes more certain without the image" in html
    assert "3 draw(s)</b>" in html and "the mean over 3 removing views" in html
    assert "truth 2 · model answered 2 · <span class='right'>✓ right</span>" in html
    assert "truth red · model answered blue · <span class='wrong'>✗ wrong</span>" in html
    assert "no ground truth given · no \\boxed{} answer · not graded" in html
    assert "accuracy 1/2 = 50.0%" in html
    assert "2 of the 6 selected (33.3%) against 4 of all 18 response tokens (22.2%): 1.50x" in html
    assert html.count('class="tok') == 18  # every token in a strip
    assert len(re.findall(r'class="tok[^"]* ans', html)) == 4  # the answer-bearing ones underlined
    assert len(re.findall(r'class="tok sel', html)) == 6  # the selected ones outlined


def test_whitespace_and_special_tokens_are_drawn_visibly():
    det = make_detection(["<think>", "I see", " ", "2", "\n", "ok\t", "<|im_end|>"], [0.1] * 7, [2, 4])
    html = report_html([det], SETTINGS)
    strip = html[html.index("<div class='resp'>") :]
    assert '<span class="ws">␣</span>' in strip  # the lone space token
    assert '<span class="ws">⏎</span><br>' in strip  # a newline: drawn, then the line breaks
    assert '<span class="ws">⇥</span>' in strip
    assert 'class="tok special"' in strip and "&lt;|im_end|&gt;" in strip
    text = terminal_summary(det)
    assert "I␣see␣2⏎ok⇥<|im_end|>" in text  # the response line
    assert any(line.split()[1:2] == ["␣"] for line in text.splitlines())  # the table's space token


def test_near_zero_warning_only_when_every_selected_shift_is_tiny():
    tiny = make_detection(["a", " b", " c"], [0.003, -0.005, 0.2], [0, 1])  # selected: 0.003, -0.005
    large = make_detection(["a", " b", " c"], [0.003, -0.005, 0.2], [0, 2], index=1)  # 0.2 selected
    html = report_html([tiny], SETTINGS)
    assert html.count("the selection is noise") == 2  # the banner and the example's own line
    assert "largest 0.0050" in html
    assert "warning: every selected token's shift is below 0.01 nats" in terminal_summary(tiny)
    assert "the selection is noise" not in report_html([large], SETTINGS)
    # the tables list tokens by |dH|: the -0.005 token before the +0.003 one
    assert large.top_tokens(3, absolute=True) == [2, 1, 0] and large.top_tokens(3) == [2, 0, 1]
    both = unescape(report_html([tiny, large], SETTINGS))
    assert "in 1 of 2 example(s) every selected token's shift is below 0.01 nats" in both


def test_tokens_json_carries_outcome_bearing_and_summary(tmp_path):
    write_outputs(_three(), tmp_path, SETTINGS)
    doc = json.loads((tmp_path / "tokens.json").read_text())
    assert doc["summary"]["selected_answer_bearing"] == 2 and doc["summary"]["accuracy"] == 0.5
    a, b, c = doc["examples"]
    assert a["outcome"] == {"truth": "2", "answer": "2", "correct": True, "format": True}
    assert b["outcome"]["correct"] is False and c["outcome"]["correct"] is None
    assert [t["answer_bearing"] for t in a["tokens"]] == [
        False,
        False,
        True,
        False,
        False,
        False,
        True,
        False,
    ]
    assert a["warning"] is None
