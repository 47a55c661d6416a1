"""cppo-eval --protocol paper / --bench: the protocol's defaults, bad input before any model, and an
end-to-end run of the bundled demo model on tiny VLMEvalKit-format files."""

from __future__ import annotations

import json

from cli.eval import main, parse_args
from cppo.benchmarks.protocol import MAX_PIXELS, MIN_PIXELS
from tests.bench_tsv import png_b64, write_tsv


def test_protocol_paper_sets_the_papers_settings_and_explicit_flags_win():
    args = parse_args(["--protocol", "paper", "--bench", "x.tsv"])
    assert (args.samples, args.temperature, args.top_p, args.max_new_tokens) == (16, 1.0, 1.0, 2048)
    assert (args.min_pixels, args.max_pixels) == (1280 * 28 * 28, 16384 * 28 * 28) == (MIN_PIXELS, MAX_PIXELS)
    assert args.max_prompt_length is None and args.drop_multi_image is False and args.instruction is True
    mine = parse_args(["--protocol", "paper", "--data", "d", "--samples", "4", "--max-prompt-length", "512"])
    assert (mine.samples, mine.max_prompt_length, mine.temperature) == (4, 512, 1.0)
    plain = parse_args(["--data", "d"])  # without the protocol, the old defaults
    assert (plain.samples, plain.max_new_tokens, plain.max_prompt_length, plain.min_pixels) == (
        1,
        256,
        512,
        None,
    )


def test_bad_input_is_one_line_and_exit_2_before_any_model(tmp_path, capsys):
    assert main(["--bench", str(tmp_path / "WeMath.tsv")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--data", "d", "--bench", "x.tsv"]) == 2
    assert "one of the two" in capsys.readouterr().err
    bad = write_tsv(tmp_path / "DynaMath.tsv", [{"index": 1, "question": "q", "answer": "1", "qid": 1}])
    assert main(["--bench", str(bad), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DynaMath.tsv:1: no column 'answer_type'" in err
    good = write_tsv(tmp_path / "MMMU_Pro_V.tsv", [{"index": 1, "A": "x", "B": "y", "answer": "A"}])
    assert main(["--bench", str(good), "--judge", "http://127.0.0.1:9/v1"]) == 2
    assert "cannot be reached" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_demo_model_end_to_end_on_two_benchmarks(tmp_path, capsys):
    options = {"A": "red", "B": "blue", "C": "green"}
    mmmu = write_tsv(
        tmp_path / "MMMU_Pro_V.tsv",
        [{"index": i, "image": png_b64((56, 56), (200, 20, 20)), **options, "answer": "A"} for i in range(2)],
    )
    wemath = write_tsv(
        tmp_path / "wm.tsv",
        [
            {"index": i, "ID": "1", "key": key, "question": "What colour?", **options, "answer": "A"}
            for i, key in enumerate(["2steps_1", "2steps_2", "2steps_multi"])
        ],
    )
    out = tmp_path / "paper.json"
    code = main(
        [
            "--protocol", "paper", "--bench", str(mmmu), f"WeMath={wemath}",
            "--samples", "2", "--max-new-tokens", "16", "--min-pixels", "3136", "--max-pixels", "12544",
            "--device", "cpu", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["MMMU_Pro_V", "WeMath", "Avg"]
    assert table[1].split() == ["metric", "acc", "Score", "(Strict)", "mean"]
    report = json.loads(out.read_text())
    assert report["settings"]["temperature"] == 1.0 and report["settings"]["samples"] == 2
    assert report["settings"]["max_pixels"] == 12544  # the explicit flag beat the protocol's value
    for name, n in (("MMMU_Pro_V", 2), ("WeMath", 3)):
        bench = report["benchmarks"][name]
        assert bench["n"] == n and len(bench["runs"]) == 2 and len(bench["questions"]) == n
        assert all(len(q["responses"]) == 2 for q in bench["questions"])
        assert sum(bench["verdicts"].values()) == 2 * n  # every prediction of every run was graded
        assert 0.0 <= bench["mean"] <= 100.0
    mean = (report["benchmarks"]["MMMU_Pro_V"]["mean"] + report["benchmarks"]["WeMath"]["mean"]) / 2
    assert table[2].split()[-1] == f"{mean:.2f}"
