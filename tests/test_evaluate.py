"""The one evaluator (cppo.models.evaluate): its report, cppo-eval end to end, the demo recipe."""

import json

import pytest

from cli.eval import main
from cppo.grading import grade
from cppo.models.evaluate import format_table, resolve_temperature, score
from cppo.toy import QUESTION_TYPES


def test_score_is_the_mean_over_questions_of_the_mean_over_k():
    questions = [
        {"question_type": "a", "accuracy": [1.0, 0.0, 0.0, 0.0], "format": [1.0, 1.0, 1.0, 1.0]},
        {"question_type": "a", "accuracy": [1.0, 1.0, 1.0, 1.0], "format": [0.0, 0.0, 0.0, 0.0]},
        {"question_type": "b", "accuracy": [0.0, 0.0, 0.0, 0.0], "format": [1.0, 0.0, 1.0, 0.0]},
    ]
    report = score(questions)
    assert report["n"] == 3
    assert report["accuracy"] == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert report["format"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert report["pass_at_k"] == pytest.approx(2 / 3)
    assert report["per_type"]["a"] == {"n": 2, "accuracy": 0.625, "format": 0.5, "pass_at_k": 1.0}
    assert report["per_type"]["b"]["accuracy"] == 0.0
    table = format_table({**report, "samples": 4})
    assert "avg@4" in table and table.splitlines()[-1].startswith("overall")
    untyped = score([{"accuracy": [1.0], "format": [1.0]}])
    assert "per_type" not in untyped and untyped["accuracy"] == 1.0


def test_temperature_rules():
    assert resolve_temperature(1, None) == 0.0 and resolve_temperature(4, None) == 1.0
    with pytest.raises(ValueError, match="4 samples at temperature 0 are 4 copies of one greedy answer"):
        resolve_temperature(4, 0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from cppo.models import build_tiny_model
    from cppo.toy import export_shapes_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    model, processor = build_tiny_model(seed=0)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    export_shapes_dataset(root / "shapes", n_train=2, n_val=2, n_test=5, seed=0)
    return root


def _run(tiny, tmp_path, *extra):
    out = tmp_path / f"eval{len(list(tmp_path.iterdir()))}.json"
    argv = [
        "--model",
        str(tiny / "model"),
        "--data",
        str(tiny / "shapes"),
        "--max-new-tokens",
        "12",
        "--batch-size",
        "6",
        "--out",
        str(out),
        *extra,
    ]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_cppo_eval_end_to_end_avg_at_k(tiny, tmp_path, capsys):
    report = _run(tiny, tmp_path, "--samples", "3")
    assert report["n"] == 5 and report["samples"] == 3 and report["temperature"] == 1.0
    assert set(report["per_type"]) <= set(QUESTION_TYPES)
    assert sum(r["n"] for r in report["per_type"].values()) == 5
    for q in report["questions"]:  # the report is the grading of the recorded responses
        assert len(q["responses"]) == 3
        assert [grade(r, q["answer"]) for r in q["responses"]] == list(zip(q["accuracy"], q["format"]))
    assert "avg@3" in capsys.readouterr().out
    again = _run(tiny, tmp_path, "--samples", "3")
    assert [q["responses"] for q in again["questions"]] == [q["responses"] for q in report["questions"]]
    other = _run(tiny, tmp_path, "--samples", "3", "--seed", "1")
    assert [q["responses"] for q in other["questions"]] != [q["responses"] for q in report["questions"]]


def test_greedy_eval_answers_as_the_model_card_evaluator(tiny, tmp_path):
    from cppo.models import load_model_and_processor
    from cppo.models.evaluate import evaluate_shapes
    from cppo.toy import split_items

    report = _run(tiny, tmp_path, "--limit", "4")
    assert report["n"] == 4 and report["temperature"] == 0.0
    model, processor = load_model_and_processor(tiny / "model")
    reference = evaluate_shapes(model, processor, split_items("test", 4, seed=0), max_new_tokens=12)
    assert [q["responses"][0] for q in report["questions"]] == reference["responses"]


def test_demo_recipe_report_is_the_evaluators_with_chance_and_blank_images(tiny):
    from cppo.models import load_model_and_processor
    from cppo.models.evaluate import evaluate_split
    from cppo.toy import CHANCE, split_items
    from cppo.toy.shapes import reasoning_agrees

    model, processor = load_model_and_processor(tiny / "model")
    result = evaluate_split(model, processor, "test", 5, seed=0, batch_size=3, max_new_tokens=12, sampled=2)
    assert set(result) == {
        "accuracy", "format", "agreement", "n", "samples", "chance", "per_type", "responses",
        "blank_image_accuracy", "sampled", "split", "seed", "image_size",
    }  # fmt: skip
    items = split_items("test", 5, seed=0)
    grades = [grade(r, it.answer) for r, it in zip(result["responses"], items)]
    assert result["n"] == 5 and result["accuracy"] == sum(a for a, _ in grades) / 5
    assert result["format"] == sum(f for _, f in grades) / 5
    assert result["chance"] == pytest.approx(sum(CHANCE[it.question_type] for it in items) / 5)
    assert list(result["per_type"]) == [q for q in QUESTION_TYPES if q in {it.question_type for it in items}]
    for q, r in result["per_type"].items():
        assert r["chance"] == CHANCE[q] and r["n"] == sum(it.question_type == q for it in items)
    assert 0.0 <= result["blank_image_accuracy"] <= 1.0
    agree = [reasoning_agrees(it.question_type, it.question, r) for r, it in zip(result["responses"], items)]
    assert result["agreement"] == sum(agree) / 5
    assert result["sampled"]["samples"] == 2 and 0.0 <= result["sampled"]["accuracy"] <= 1.0


def test_cppo_eval_errors_exit_2(tiny, tmp_path, capsys):
    assert main(["--model", str(tiny / "model"), "--data", str(tmp_path / "none")]) == 2
    assert "data path" in capsys.readouterr().err
    assert main(["--data", str(tiny / "shapes"), "--samples", "2", "--temperature", "0"]) == 2


def _split_worker(rank: int, init: str, model_dir: str, results) -> None:
    """One of two gloo processes: the split evaluation, counting this process's generate calls; rank 0
    also the one-process evaluation of the same items first."""
    import torch
    import torch.distributed as dist

    import cppo.models.evaluate as ev
    from cppo.models import load_model_and_processor
    from cppo.toy import split_items

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        model, processor = load_model_and_processor(model_dir)
        items = ev._shapes_prompts(split_items("test", 5, seed=0), "test", blank_images=False)
        kw = dict(samples=2, max_new_tokens=12, batch_size=4, seed=7)  # 2 questions a call: 3 calls
        one = ev.evaluate(model, processor, items, **kw) if rank == 0 else None
        calls, generate = [], ev.generate_responses
        ev.generate_responses = lambda *a, **k: calls.append(k["generator_seed"]) or generate(*a, **k)
        split = ev.evaluate(model, processor, items, rank=rank, world=2, **kw)
        results[rank] = (one, split, calls)
    finally:
        dist.destroy_process_group()


def test_the_evaluation_split_over_two_processes_equals_one_process(tiny, tmp_path):
    """Two gloo processes each answer their share of the batches (rank 0 batches 0 and 2, rank 1
    batch 1, each with its one-process seed 7 * 100003 + b) and both return the one-process report,
    sampled responses, grades, per-type table and all, value for value."""
    import os

    import torch.multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    results = mp.Manager().dict()
    mp.spawn(_split_worker, args=(f"file://{tmp_path / 'store'}", str(tiny / "model"), results), nprocs=2)
    (one, split0, calls0), (_, split1, calls1) = results[0], results[1]
    assert calls0 == [700021, 700023] and calls1 == [700022]
    assert split0 == one and split1 == one
    assert one["n"] == 5 and len({r for q in one["questions"] for r in q["responses"]}) > 1
