"""The perception evaluation under views (cppo.detect.views_eval, cppo-eval --views): every number on a
constructed case, the passes' plumbing with a stand-in answerer, the entropy pass against a slow
reference, and cppo-eval --views on the bundled demo model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cppo.detect import views_eval
from cppo.detect.views_eval import (
    evaluate_views,
    format_views_table,
    item_numbers,
    response_entropies,
    summarize_views,
    view_metrics,
)
from cppo.grading import grade
from cppo.models.evaluate import EvalItem
from cppo.perturb import Preset, get_perturbation, get_preset


def _record(qtype, clean, plus, minus, blank, h, shift, has_image=True):
    """An item record: each view given as (answers, grades); plus/minus are lists over draws."""

    def view(a, g):
        return {"answers": a, "accuracy": g, "responses": [""] * len(a)}

    return {
        "question_type": qtype,
        "has_image": has_image,
        "clean": view(*clean),
        "preserving": [view(*d) for d in plus],
        "removing": [view(*d) for d in minus],
        "blank": view(*blank),
        "entropy": {"clean": h, "shift": shift},
    }


# S = 2 answers an item, K = 2 draws of each kind
A = _record(
    "count",
    clean=(["3", "3"], [1.0, 1.0]),
    plus=[(["3", "2"], [1.0, 0.0]), (["3.0", None], [1.0, 0.0])],  # "3.0" is "3"; no answer is not
    minus=[(["2", "2"], [0.0, 0.0]), (["3", "1"], [1.0, 0.0])],
    blank=(["0", "0"], [0.0, 0.0]),
    h=[0.5, 0.7],
    shift=[[0.2, 0.4], [0.0, 0.2]],  # [K][S]
)
B = _record(
    "color",
    clean=(["red", "blue"], [1.0, 0.0]),
    plus=[(["red", "blue"], [1.0, 0.0]), (["red", "red"], [1.0, 1.0])],
    minus=[(["blue", "blue"], [0.0, 0.0]), (["green", "red"], [0.0, 1.0])],
    blank=(["red", "red"], [1.0, 1.0]),
    h=[1.0, 1.0],
    shift=[[-0.1, 0.1], [0.3, 0.1]],
)
TEXT = _record(
    "color", (["x"], [1.0]), [(["x"], [1.0])] * 2, [(["x"], [1.0])] * 2, (["x"], [1.0]), [], [[], []], False
)


def test_each_number_of_one_item_worked_out():
    a = item_numbers(A)
    assert a["clean"] == 1.0
    assert a["robustness"] == pytest.approx((0.5 + 0.5) / 2)
    assert a["consistency"] == pytest.approx((0.5 + 0.5) / 2)  # draw 0: 3=3, 2!=3; draw 1: 3.0=3, none
    assert a["removing"] == pytest.approx((0.0 + 0.5) / 2)
    assert a["blank"] == 0.0
    assert a["entropy"] == pytest.approx(0.6)
    assert a["entropy_shift"] == pytest.approx(((0.2 + 0.4) / 2 + (0.0 + 0.2) / 2) / 2)  # 0.2
    b = item_numbers(B)
    assert (b["clean"], b["robustness"], b["consistency"]) == pytest.approx((0.5, 0.75, 0.75))
    assert (b["removing"], b["blank"], b["entropy_shift"]) == pytest.approx((0.25, 1.0, 0.1))


def test_summary_overall_per_type_chance_and_reliance_worked_out():
    report = summarize_views([A, B, TEXT], chance={"count": 0.25, "color": 0.5})
    assert report["n"] == 2 and report["no_image"] == 1  # the text-only item counts in no number
    assert report["clean"] == pytest.approx(0.75)  # (1 + 0.5) / 2
    assert report["robustness"] == pytest.approx(0.625)  # (0.5 + 0.75) / 2
    assert report["consistency"] == pytest.approx(0.625)
    assert report["removing"] == pytest.approx(0.25)  # (0.25 + 0.25) / 2
    assert report["blank"] == pytest.approx(0.5)
    assert report["reliance"] == pytest.approx(0.5) and report["blank_reliance"] == pytest.approx(0.25)
    assert report["chance"] == pytest.approx(0.375)  # (0.25 + 0.5) / 2, item-weighted
    assert report["removing_over_chance"] == pytest.approx(-0.125)
    assert report["blank_over_chance"] == pytest.approx(0.125)
    assert report["entropy"] == pytest.approx(0.8) and report["entropy_shift"] == pytest.approx(0.15)
    count, color = report["per_type"]["count"], report["per_type"]["color"]
    assert count["n"] == 1 and count["chance"] == 0.25 and count["reliance"] == pytest.approx(0.75)
    assert color["n"] == 1 and color["blank_over_chance"] == pytest.approx(0.5)
    unknown = summarize_views([A, B], chance={"count": 0.25})  # color's chance is not known
    assert unknown["chance"] is None and unknown["removing_over_chance"] is None
    assert unknown["per_type"]["count"]["chance"] == 0.25
    assert view_metrics(report)["eval/views/consistency"] == pytest.approx(0.625)
    table = format_views_table(report).splitlines()
    assert table[-1].split()[:4] == ["overall", "2", "0.750", "0.625"] and table[-1].endswith("+0.150")


# ---------------------------------------------------------------- the passes, with a stand-in answerer

RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "white": (255, 255, 255), "grey": (128, 128, 128)}


def _colour(image: Image.Image) -> str:
    """The named colour nearest to the image's mean pixel."""
    mean = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3).mean(0)
    return min(RGB, key=lambda c: float(((mean - np.array(RGB[c])) ** 2).sum()))


def _stand_in_evaluate(calls):
    """evaluate() of a model that answers the colour it sees (S = 1); records what it was shown."""

    def fake(model, processor, items, **kw):
        calls.append([[_colour(im) for im in it.images] for it in items])
        questions = []
        for it in items:
            seen = _colour(it.images[0]) if it.images else "none"
            response = f"<think>I see {seen}.</think> \\boxed{{{seen}}}"
            questions.append(
                {
                    "source": it.source,
                    "question_type": it.question_type,
                    "responses": [response],
                    "accuracy": [grade(response, it.answer)[0]],
                    "response_ids": [[5, 6, 7]],
                }
            )
        return {"questions": questions, "samples": 1, "temperature": 0.0}

    return fake


def test_views_reach_the_right_passes_and_the_records_replay(monkeypatch):
    grey = get_perturbation("grey_fill")
    keep = get_perturbation("identity")
    preset = Preset("test-views", (keep,), (grey,))
    calls, rows_seen = [], []
    monkeypatch.setattr(views_eval, "evaluate", _stand_in_evaluate(calls))

    def fake_entropies(model, processor, rows, *args):  # H(I) = 1 + row, dH of draw k = k + 1
        rows_seen.extend(rows)
        return [1.0 + r for r in range(len(rows))], [[k + 1.0 for k in range(len(rows[0][2]))] for _ in rows]

    monkeypatch.setattr(views_eval, "response_entropies", fake_entropies)
    img = {c: Image.new("RGB", (28, 28), RGB[c]) for c in RGB}
    data = [
        EvalItem("What colour?", "red", [img["red"]], "color", "s:0"),
        EvalItem("What colour?", "green", [img["red"]], "color", "s:1"),  # the model is wrong here
        EvalItem("How many?", "2", [], "text", "s:2"),  # no image: answered, counted in no number
        EvalItem("What colour?", "green", [img["green"]], "color", "s:3"),
    ]
    report = evaluate_views(None, None, data, preset, draws=2, chance={"color": 0.25}, seed=7)
    # passes: clean, I+ x2, I- x2, blank; each sees every item with the right images
    assert [c[0] for c in calls] == [["red"], ["red"], ["red"], ["grey"], ["grey"], ["white"]]
    assert all(c[2] == [] for c in calls)
    assert report["n"] == 3 and report["no_image"] == 1
    assert report["clean"] == pytest.approx(2 / 3) and report["robustness"] == pytest.approx(2 / 3)
    assert report["consistency"] == 1.0 and report["removing"] == 0.0 and report["blank"] == 0.0
    assert report["reliance"] == pytest.approx(2 / 3) and report["removing_over_chance"] == -0.25
    # the entropy rows are the items with an image, in order, each with its K removing views
    assert [r[0] for r in rows_seen] == ["What colour?"] * 3 and all(len(r[2]) == 2 for r in rows_seen)
    assert [it["entropy"]["clean"] for it in report["items"]] == [[1.0], [2.0], [], [3.0]]
    assert report["entropy"] == pytest.approx(2.0) and report["entropy_shift"] == pytest.approx(1.5)
    # the settings and every draw are recorded; a record gives its view back
    assert report["settings"]["preset"] == preset.to_dict() and report["settings"]["seed"] == 7
    rec = report["items"][3]["removing"][1]["views"][0]
    assert rec["name"] == "grey_fill"
    again = np.random.default_rng(np.random.SeedSequence([7, 3, 1, 1, 0]))
    assert preset.draw_view(img["green"], again, "removing")[1] == rec
    assert json.loads(json.dumps(report))["items"][0]["preserving"][0]["answers"] == ["red"]


# ---------------------------------------------------------------- the model passes


@torch.no_grad()
def test_response_entropies_equal_a_full_logits_reference():
    """The chunked teacher-forced pass against the model's own full logits, row by row."""
    from cppo.loss.entropy import token_entropy
    from cppo.models import append_responses, encode_images, encode_prompts, response_logits
    from tests.helpers import shapes_items, tiny_model_and_processor

    torch.manual_seed(0)
    model, processor = tiny_model_and_processor(seed=1)
    items = shapes_items(3, seed=4)
    preset = get_preset("paper")
    views = [[preset.draw_view(it.image, k, "removing")[0]] for k, it in enumerate(items)]
    rows = [
        (it.question, [it.image], [v], [11, 12, -1, 13][: 2 + i])
        for i, (it, v) in enumerate(zip(items, views))
    ]
    h, shifts = response_entropies(model, processor, rows, None, 0.7, 2, 3)
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # the views changed something, so the checks compare non-zero numbers: a random tiny model barely
    # looks, and a row's shift can be float noise (7e-7 on one CPU), so this holds over the rows
    assert max(abs(d) for (d,) in shifts) > 1e-4
    for (q, imgs, (view,), ids), h_row, (d_row,) in zip(rows, h, shifts):
        enc = encode_prompts(processor, [q], [imgs], None)
        resp = torch.tensor([[i if i >= 0 else pad for i in ids]])
        mask = torch.tensor([[i >= 0 for i in ids]])
        inputs = append_responses(enc, resp, mask)
        clean = token_entropy(response_logits(model, inputs), 0.7)[0][mask[0]]
        minus = token_entropy(response_logits(model, inputs, encode_images(processor, [[view]])[0]), 0.7)
        assert h_row == pytest.approx(float(clean.mean()), abs=1e-5)
        assert d_row == pytest.approx(float((minus[0][mask[0]] - clean).mean()), abs=1e-5)


def test_views_that_change_nothing_give_consistency_1_and_no_shift():
    """A real model: an identity I+ and an identity 'removing' view answer as the clean image."""
    from tests.helpers import shapes_items, tiny_model_and_processor

    model, processor = tiny_model_and_processor(seed=2)
    same = get_perturbation("identity")
    preset = Preset("unchanged", (same,), (same.with_options(name="identity_r", kind="removing"),))
    data = [EvalItem(it.question, it.answer, [it.image], it.question_type) for it in shapes_items(4, seed=5)]
    report = evaluate_views(model, processor, data, preset, draws=1, max_new_tokens=8, batch_size=3)
    assert report["robustness"] == report["clean"] == report["removing"]
    assert report["consistency"] == pytest.approx(
        sum(it["clean"]["answers"][0] is not None for it in report["items"]) / 4
    )  # every answer repeats; an item without a boxed answer is not "the same answer"
    assert report["entropy_shift"] == pytest.approx(0.0, abs=1e-6) and report["entropy"] > 0


# ---------------------------------------------------------------- cppo-eval --views on the demo model


def test_cppo_eval_views_on_the_demo_model(tmp_path, capsys):
    from cli.eval import main
    from cppo.toy import CHANCE, export_shapes_dataset

    export_shapes_dataset(tmp_path / "shapes", n_train=1, n_val=1, n_test=6, seed=0)
    out = tmp_path / "eval.json"
    argv = ["--data", str(tmp_path / "shapes"), "--views", "paper", "--view-draws", "1", "--limit", "6"]
    assert main([*argv, "--max-new-tokens", "48", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    views = report["views"]
    assert views["n"] == 6 and views["clean"] == pytest.approx(report["accuracy"])
    assert views["settings"]["preset"]["name"] == "paper" and views["settings"]["draws"] == 1
    assert views["chance"] == pytest.approx(sum(CHANCE[q["question_type"]] for q in report["questions"]) / 6)
    assert views["entropy_shift"] is not None and views["entropy"] > 0
    preset = get_preset("paper")
    names = {e.name for e in preset.preserving}, {e.name for e in preset.removing}
    for item in views["items"]:
        assert item["preserving"][0]["views"][0]["name"] in names[0]
        assert item["removing"][0]["views"][0]["name"] in names[1]
    assert "response_ids" not in report["questions"][0]
    printed = capsys.readouterr().out
    assert "cl-I-" in printed and printed.strip().splitlines()[-1].startswith("overall")


def test_cppo_eval_views_refuses_bad_flags_before_loading(tmp_path, capsys):
    from cli.eval import main

    for flags, words in (
        (["--views", "nope"], "--views nope: unknown preset 'nope'"),
        (["--views", "paper", "--view-draws", "0"], "--view-draws must be >= 1"),
    ):
        assert main(["--data", str(tmp_path / "none"), *flags]) == 2
        assert words in capsys.readouterr().err


# ---------------------------------------------------------------- the trainer's --eval-views


def test_trainer_evaluation_adds_the_view_metrics_of_the_same_items():
    from cppo.rl.config import ConfigError, TrainConfig
    from cppo.rl.flags import parse_args
    from cppo.rl.loop import _evaluate
    from tests.helpers import shapes_items, tiny_model_and_processor

    with pytest.raises(ConfigError, match="eval_views: unknown preset 'nope'"):
        TrainConfig(eval_views="nope")
    cfg = parse_args(["--eval-views", "paper", "--eval-samples", "1", "--max-new-tokens", "8"])
    model, processor = tiny_model_and_processor(seed=2)
    data = [EvalItem(it.question, it.answer, [it.image], it.question_type) for it in shapes_items(3, seed=6)]
    metrics = _evaluate(model, processor, data, cfg, 0, 1)
    direct = evaluate_views(
        model, processor, data, "paper", draws=1, seed=cfg.seed, limit=64, max_new_tokens=8
    )
    assert metrics["eval/accuracy"] == direct["clean"]
    keys = ("robustness", "consistency", "removing", "blank", "entropy_shift")
    assert {k: metrics[f"eval/views/{k}"] for k in keys} == pytest.approx({k: direct[k] for k in keys})
    assert "eval/views/robustness" not in _evaluate(
        model, processor, data, parse_args(["--max-new-tokens", "8"]), 0, 1
    )
