"""The bundled demo checkpoint: its files, that it loads, and that it scores what its card says."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cppo.models import demo_model_path
from cppo.models.evaluate import evaluate_shapes
from cppo.toy import split_items
from tests.helpers import demo_model_and_processor

TOLERANCE = 0.03  # the card's own statement: ±3 points on the CI slice

DEMO = demo_model_path()
pytestmark = pytest.mark.skipif(not (DEMO / "config.json").is_file(), reason="demo checkpoint not built")


def test_demo_checkpoint_is_small_bf16_and_complete():
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.jinja",
        "MODEL_CARD.md",
        "eval.json",
        "eval_slice.json",
        "warmstart.json",
    ]:
        assert (DEMO / name).is_file(), name
    assert (DEMO / "model.safetensors").stat().st_size < 10e6
    with safe_open(DEMO / "model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {torch.bfloat16}


def test_card_states_the_numbers_of_its_eval_files():
    card = (DEMO / "MODEL_CARD.md").read_text()
    ev = json.loads((DEMO / "eval.json").read_text())
    sl = json.loads((DEMO / "eval_slice.json").read_text())
    assert f"**{100 * ev['accuracy']:.1f}**" in card and f"**{100 * ev['format']:.1f}**" in card
    assert f"accuracy {100 * sl['accuracy']:.1f} %, format {100 * sl['format']:.1f} %" in card
    for q, v in ev["per_type"].items():
        assert f"| {q} | {v['n']} | {100 * v['accuracy']:.1f} |" in card

def test_the_demo_model_sees_and_speaks():
    """What a demo model must be for the method's effects to show (its card's numbers, 400 test
    items): right on most questions by looking, each question type above guessing, reasoning that
    states what the boxed answer says, and sampled answers less sure than greedy ones."""
    ev = json.loads((DEMO / "eval.json").read_text())
    assert ev["format"] >= 0.99
    assert ev["accuracy"] >= 0.75, ev["accuracy"]
    assert ev["agreement"] >= 0.95, ev["agreement"]
    for q, v in ev["per_type"].items():
        assert v["accuracy"] >= v["chance"] + 0.20, (q, v)
    assert abs(ev["blank_image_accuracy"] - ev["chance"]) <= 0.10  # without the image: guessing
    assert ev["sampled"]["accuracy"] <= ev["accuracy"] - 0.05  # headroom for RL to sharpen


def test_demo_model_scores_its_card_on_the_ci_slice():
    torch.set_num_threads(2)
    sl = json.loads((DEMO / "eval_slice.json").read_text())
    model, processor = demo_model_and_processor()
    items = split_items("test", sl["n"], seed=sl["seed"], image_size=sl["image_size"])
    result = evaluate_shapes(model, processor, items)
    assert abs(result["accuracy"] - sl["accuracy"]) <= TOLERANCE, (result["accuracy"], sl["accuracy"])
    assert abs(result["format"] - sl["format"]) <= TOLERANCE, (result["format"], sl["format"])
    assert abs(result["agreement"] - sl["agreement"]) <= TOLERANCE, (result["agreement"], sl["agreement"])
