"""bench/perception_evidence.py: its table's worked numbers, and a run over two tiny fake runs."""

import json

import pytest

from bench.compare_algos import mean_ci
from bench.perception_evidence import METRICS, find_runs, main, write_markdown


def _model(clean, shift, per_type=None):
    mean = {k: clean - 0.1 * i for i, k in enumerate(METRICS)}
    mean.update(entropy_shift=shift, chance=0.375)
    return {"mean": mean, "per_type": per_type or {"more_than": {k: 0.5 for k in METRICS}}}


def test_table_rows_and_paired_differences_worked_out(tmp_path):
    start = _model(0.60, 0.00)
    runs = [
        {"algo": algo, "seed": s, **_model(base + 0.01 * s, 0.1 * s)}
        for s in range(3)
        for algo, base in (("grpo", 0.70), ("cppo", 0.72))
    ]
    args = {"views": "paper", "draws": 2, "n": 10, "samples": 1, "eval_seeds": [1, 2]}
    lines = write_markdown({"args": args, "start": start, "runs": runs}, tmp_path).splitlines()
    assert (tmp_path / "results.md").read_text().splitlines() == lines
    grpo = next(line for line in lines if line.startswith("| grpo |"))
    m, h = mean_ci([0.70, 0.71, 0.72])
    assert grpo.split(" | ")[1] == f"{100 * m:.1f} ± {100 * h:.1f}"  # clean, over training seeds
    assert grpo.split(" | ")[7] == f"{mean_ci([0.0, 0.1, 0.2])[0]:+.3f} ± {mean_ci([0.0, 0.1, 0.2])[1]:.3f}"
    paired = next(line for line in lines if line.startswith("| cppo − grpo |"))
    assert paired.split(" | ")[1] == "+2.0 ± 0.0"  # 0.72 + 0.01 s - (0.70 + 0.01 s), every seed
    assert paired.split(" | ")[-1] == "3 |"
    vs_start = next(line for line in lines if line.startswith("| grpo − start |"))
    assert vs_start.split(" | ")[1] == f"{100 * (m - 0.60):+.1f} ± {100 * h:.1f}"
    assert any(line.startswith("| start | more_than | 50.0 |") for line in lines)


def test_two_tiny_fake_runs_are_scored_at_their_last_checkpoint(tmp_path):
    from cppo.rl.checkpoint import save_checkpoint
    from cppo.toy import export_shapes_dataset
    from tests.helpers import tiny_model_and_processor

    model, processor = tiny_model_and_processor(seed=1)
    save_checkpoint(
        tmp_path / "runs" / "grpo-s0", 1, tiny_model_and_processor(seed=5)[0], processor, None, None, {}
    )
    save_checkpoint(tmp_path / "runs" / "grpo-s0", 3, model, processor, None, None, {})
    plain = tmp_path / "runs" / "cppo-seed0"  # a model folder itself
    tiny_model_and_processor(seed=2)[0].save_pretrained(plain)
    processor.save_pretrained(plain)
    start = tmp_path / "start"
    tiny_model_and_processor(seed=0)[0].save_pretrained(start)
    processor.save_pretrained(start)
    (tmp_path / "runs" / "notes").mkdir()  # not a run: ignored
    export_shapes_dataset(tmp_path / "shapes", n_train=1, n_val=1, n_test=3, seed=0)
    assert [(r["algo"], r["seed"]) for r in find_runs([str(tmp_path / "runs")])] == [("cppo", 0), ("grpo", 0)]
    out = tmp_path / "out"
    argv = ["--runs", str(tmp_path / "runs"), "--start", str(start), "--data", str(tmp_path / "shapes")]
    argv += ["--n", "3", "--eval-seeds", "1", "2", "--draws", "1", "--max-new-tokens", "6", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    grpo = next(r for r in summary["runs"] if r["algo"] == "grpo")
    assert grpo["model"].endswith("step-000003")
    assert len(grpo["per_seed"]) == 2 and grpo["per_seed"][0]["n"] == 3
    for k in METRICS:
        assert grpo["mean"][k] == pytest.approx(sum(r[k] for r in grpo["per_seed"]) / 2)
    assert grpo["per_seed"][0]["settings"]["seed"] == 1 and grpo["per_seed"][1]["settings"]["seed"] == 2
    table = (out / "results.md").read_text()
    assert "| grpo − cppo |" in table and "| cppo − start |" in table
    with pytest.raises(SystemExit, match="no <algo>-s<seed> run folder"):
        find_runs([str(tmp_path / "shapes")])
