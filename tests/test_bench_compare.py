"""bench/compare_algos.py's statistics: the confidence interval and the table it writes."""

import statistics

import pytest

from bench.compare_algos import mean_ci, write_markdown


def test_mean_ci_is_students_t_half_width():
    xs = [0.50, 0.55, 0.60, 0.52, 0.58]
    m, h = mean_ci(xs)
    assert m == pytest.approx(0.55)
    # t(0.975, 4) = 2.776; sd of xs = 0.0406...
    assert h == pytest.approx(2.776 * statistics.stdev(xs) / 5**0.5)
    assert mean_ci([0.4]) == (0.4, 0.0)


def test_markdown_has_start_each_algo_and_the_paired_difference(tmp_path):
    def ev(acc):
        block = {"accuracy": acc, "format": 1.0, "per_type": {"more_than": acc}}
        return {"sampled": block, "greedy": block}

    runs = [
        {"algo": algo, "seed": s, "step_s": 1.0, "after": ev(base + 0.01 * s)}
        for s in range(3)
        for algo, base in (("grpo", 0.60), ("cppo", 0.70))
    ]
    args = {"eval_n": 10, "steps": 5, "seeds": [0, 1, 2], "samples": 4, "algos": ["grpo", "cppo"]}
    write_markdown({"before": ev(0.5), "runs": runs, "args": args}, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| start | 50.0 | 50.0 |" in md
    assert "| grpo | 61.0 ± 2.5 |" in md  # mean 0.61, sd 0.01, t 4.303 / sqrt 3
    assert "cppo − grpo, avg@4, paired by seed: 10.0 ± 0.0 points." in md
