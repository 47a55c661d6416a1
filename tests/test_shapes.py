"""The shapes task: answers recovered from the rendered pixels alone, balanced answers, the exporter."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cppo.toy import (
    CHANCE,
    COLORS,
    QUESTION_TYPES,
    export_shapes_dataset,
    make_item,
    split_items,
    target_response,
)
from cppo.toy.shapes import BACKGROUND, answer_from_reasoning, reasoning_agrees


def components(image: Image.Image) -> list[dict]:
    """Every shape in the image, found from pixels only: exact-colour connected components.

    Kind from the fill ratio of the bounding box: square ~1, circle ~pi/4, triangle ~1/2.
    """
    arr = np.asarray(image)  # (H, W, 3)
    found = []
    for name, rgb in COLORS.items():
        labels, n = ndimage.label(np.all(arr == rgb, axis=-1))
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            area = int((labels[sl] == k).sum())
            h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            fill = area / (h * w)
            kind = "square" if fill > 0.92 else "circle" if fill > 0.68 else "triangle"
            found.append({"color": name, "kind": kind, "cx": (sl[1].start + sl[1].stop - 1) / 2})
    return found


def oracle(image: Image.Image, question: str) -> str:
    shapes = components(image)

    def count(color):
        return sum(s["color"] == color for s in shapes)

    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(count(m[1]))
    if m := re.fullmatch(r"What color is the (\w+)\?", question):
        (only,) = [s for s in shapes if s["kind"] == m[1]]
        return only["color"]
    if m := re.fullmatch(r"Which is further left, the (\w+) (\w+) or the (\w+) (\w+)\?", question):
        (a,) = [s for s in shapes if (s["color"], s["kind"]) == (m[1], m[2])]
        (b,) = [s for s in shapes if (s["color"], s["kind"]) == (m[3], m[4])]
        return f"{m[1]} {m[2]}" if a["cx"] < b["cx"] else f"{m[3]} {m[4]}"
    if m := re.fullmatch(r"Are there more (\w+) shapes than (\w+) shapes\?", question):
        return "yes" if count(m[1]) > count(m[2]) else "no"
    raise AssertionError(f"oracle cannot read {question!r}")


@pytest.mark.parametrize("question_type", QUESTION_TYPES)
def test_answers_match_an_oracle_that_reads_only_the_pixels(question_type):
    rng = np.random.default_rng(1)
    for _ in range(60):
        item = make_item(rng, question_type=question_type)
        assert item.question_type == question_type
        assert oracle(item.image, item.question) == item.answer, item.question


def test_oracle_sees_every_shape_and_nothing_else():
    rng = np.random.default_rng(2)
    for _ in range(40):
        item = make_item(rng)
        arr = np.asarray(item.image)
        assert len(components(item.image)) == len(item.scene.shapes)
        palette = {tuple(c) for c in arr.reshape(-1, 3)}
        assert palette <= set(COLORS.values()) | {BACKGROUND}  # no anti-aliasing: exact colours only


def test_answers_are_balanced_so_chance_is_one_over_the_answers():
    rng = np.random.default_rng(3)
    for qtype in QUESTION_TYPES:
        answers = Counter(make_item(rng, question_type=qtype).answer for _ in range(400))
        if qtype == "further_left":  # the answer is one of the two named shapes, each half the time
            continue
        assert len(answers) == round(1 / CHANCE[qtype]), (qtype, answers)
        assert max(answers.values()) / 400 < CHANCE[qtype] + 0.1, (qtype, answers)


def test_further_left_answer_is_first_or_second_named_equally_often():
    rng = np.random.default_rng(4)
    first = 0
    for _ in range(400):
        item = make_item(rng, question_type="further_left")
        first += item.question.split(", the ")[1].startswith(item.answer + " or")
    assert 0.4 < first / 400 < 0.6


def test_target_response_is_in_method_format_and_names_the_answer():
    from cppo.grading import grade

    rng = np.random.default_rng(5)
    for _ in range(20):
        item = make_item(rng)
        response = target_response(item)
        assert grade(response, item.answer) == (1.0, 1.0)
        if item.question_type == "more_than":  # the reasoning names the two counts that decide it
            k1, k2 = (int(x) for x in re.findall(r"\d", item.reasoning))
            assert (k1 > k2) == (item.answer == "yes")
        else:
            assert item.answer in item.reasoning


def test_unknown_question_type_lists_the_valid_ones():
    with pytest.raises(ValueError, match="count_color"):
        make_item(np.random.default_rng(0), question_type="size")


def _digest(split_dir):
    rows = [json.loads(line) for line in (split_dir / "data.jsonl").read_text().splitlines()]
    return rows, [hashlib.sha1((split_dir / r["image"]).read_bytes()).hexdigest() for r in rows]


def test_export_layout_is_relative_and_complete(tmp_path):
    paths = export_shapes_dataset(tmp_path / "d", n_train=6, n_val=3, n_test=4, seed=0)
    assert set(paths) == {"train", "val", "test"}
    for split, n in (("train", 6), ("val", 3), ("test", 4)):
        assert paths[split] == tmp_path / "d" / split / "data.jsonl"
        rows = [json.loads(line) for line in paths[split].read_text().splitlines()]
        assert len(rows) == n
        for i, row in enumerate(rows, start=1):
            assert set(row) == {"image", "question", "answer", "question_type"}
            assert row["image"] == f"images/{i:06d}.png"
            img = Image.open(paths[split].parent / row["image"])
            assert img.size == (112, 112) and img.mode == "RGB"
            assert oracle(img, row["question"]) == row["answer"]  # the PNG round trip keeps the answer


def test_export_is_deterministic_by_seed_and_splits_are_disjoint(tmp_path):
    a = export_shapes_dataset(tmp_path / "a", 10, 5, 5, seed=3)
    b = export_shapes_dataset(tmp_path / "b", 10, 5, 5, seed=3)
    c = export_shapes_dataset(tmp_path / "c", 10, 5, 5, seed=4)
    hashes = {}
    for split in a:
        rows_a, h_a = _digest(a[split].parent)
        rows_b, h_b = _digest(b[split].parent)
        assert rows_a == rows_b and h_a == h_b
        assert h_a != _digest(c[split].parent)[1]
        hashes[split] = set(h_a)
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]


def test_test_split_does_not_depend_on_the_other_sizes(tmp_path):
    small = export_shapes_dataset(tmp_path / "s", 2, 2, 3, seed=0)
    large = export_shapes_dataset(tmp_path / "l", 9, 4, 6, seed=0)
    assert _digest(small["test"].parent)[1] == _digest(large["test"].parent)[1][:3]
    # and split_items (what the evaluation reads) gives the same items as the export
    items = split_items("test", 3, seed=0)
    rows, _ = _digest(small["test"].parent)
    assert [(it.question, it.answer) for it in items] == [(r["question"], r["answer"]) for r in rows]


@pytest.mark.parametrize("question_type", QUESTION_TYPES)
def test_reasoning_of_every_target_implies_its_answer_and_a_relabelled_one_stays_consistent(question_type):
    """answer_from_reasoning recovers each target's answer from its think sentence alone; a
    relabelled target (the warm start's answer noise) names another valid answer, consistently."""
    from cppo.models.warmstart import relabel_item

    rng = np.random.default_rng(3)
    for _ in range(60):
        item = make_item(rng, question_type=question_type)
        response = target_response(item)
        assert answer_from_reasoning(question_type, item.question, response) == item.answer
        assert reasoning_agrees(question_type, item.question, response)
        other = relabel_item(rng, item)
        assert other.answer != item.answer and other.question == item.question
        assert reasoning_agrees(question_type, item.question, target_response(other))
        assert not reasoning_agrees(question_type, item.question, response.replace(item.answer, "", 1))


@pytest.mark.parametrize(
    "question, response",
    [
        ("How many red shapes are there?", "<think>I see 2 blue shapes.</think> \\boxed{2}"),  # other colour
        ("How many red shapes are there?", "<think>I see 2 red shapes.</think> \\boxed{3}"),  # disagrees
        ("How many red shapes are there?", "<think>I see 2 red shapes.</think>"),  # no box
        ("What color is the square?", "<think>The circle is red.</think> \\boxed{red}"),  # other shape
        ("What color is the square?", "<think>The square is pink.</think> \\boxed{pink}"),  # not a colour
        (
            "Which is further left, the red circle or the blue square?",
            "<think>The red circle is left of the blue circle.</think> \\boxed{red circle}",
        ),
        (  # the names out of the question's order
            "Which is further left, the red circle or the blue square?",
            "<think>The blue square is right of the red circle.</think> \\boxed{red circle}",
        ),
        (
            "Which is further left, the red circle or the blue square?",
            "<think>The red circle is right of the blue square.</think> \\boxed{red circle}",
        ),
        (
            "Are there more red shapes than blue shapes?",
            "<think>I see 1 red and 1 blue shapes.</think> \\boxed{no}",  # a tie implies no answer
        ),
        (
            "Are there more red shapes than blue shapes?",
            "<think>I see 2 red and 1 blue shapes.</think> \\boxed{no}",
        ),
        ("Are there more red shapes than blue shapes?", "I see 2 red and 1 blue shapes. \\boxed{yes}"),
    ],
)
def test_reasoning_that_is_malformed_or_disagrees_with_the_box_is_not_counted(question, response):
    qtype = {"How": "count_color", "What": "color_of_shape", "Which": "further_left", "Are": "more_than"}
    assert not reasoning_agrees(qtype[question.split()[0]], question, response)


def test_faint_variant_draws_the_same_items_in_fainter_colours(tmp_path):
    from cppo.toy.__main__ import main
    from cppo.toy.shapes import faint_colors

    faint = faint_colors(0.25)
    assert faint["red"] == (246, 201, 201)  # 255 + 0.25 * (220 - 255), 255 + 0.25 * (40 - 255), ...
    full, pale = split_items("test", 12, seed=3), split_items("test", 12, seed=3, contrast=0.25)
    for a, b in zip(full, pale):
        assert (a.question, a.answer, a.scene) == (b.question, b.answer, b.scene)
        back = np.asarray(b.image).copy()  # the faint image with every faint colour put back at full
        for name, rgb in faint.items():
            back[np.all(np.asarray(b.image) == rgb, axis=-1)] = COLORS[name]
        assert np.array_equal(back, np.asarray(a.image)) and not np.array_equal(back, np.asarray(b.image))
    for bad in (0.0, 1.5, 0.001):
        with pytest.raises(ValueError, match="contrast"):
            faint_colors(bad)
    paths = export_shapes_dataset(tmp_path / "faint", 2, 2, 3, seed=0, contrast=0.25)
    rows = paths["test"].read_text()
    assert rows == export_shapes_dataset(tmp_path / "full", 2, 2, 3, seed=0)["test"].read_text()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "none"), "--contrast", "0"])
    assert not (tmp_path / "none").exists()
