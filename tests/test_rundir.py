"""A run directory belongs to one run (cppo.rl.rundir, issue 17 item 5): each algorithm has its own
default folder, a fresh run into a folder holding an earlier run is refused and changes nothing, and
--overwrite deletes the earlier run's files (only those) before the new run writes its own."""

import json
from pathlib import Path

import pytest

from cli.train import main as train_main
from cppo.rl.flags import parse_args
from cppo.rl.plan import run_dir_line
from cppo.rl.rundir import TRASH, clear_earlier_run, earlier_run


def _flags(tiny_dir, data, *extra):
    tiny = "--max-steps 1 --prompts-per-step 2 --group-size 2 --micro-batch-size 2 --max-new-tokens 4"
    return ["--model", str(tiny_dir), "--data", str(data), *tiny.split(), "--no-tensorboard", *extra]


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _snapshot(root: Path) -> dict:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.is_file() and p.read_bytes())
        for p in root.rglob("*")
    }


def test_the_default_run_directory_names_the_algorithm():
    assert [parse_args(["--algo", a]).output_dir for a in ("cppo", "grpo", "papo")] == [
        "runs/cppo",
        "runs/grpo",
        "runs/papo",
    ]
    assert parse_args(["--algo", "grpo", "--output-dir", "mine"]).output_dir == "mine"


def test_three_algorithms_no_longer_collide_and_a_second_fresh_run_is_refused(
    tiny_dir, data, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    for algo in ("cppo", "grpo", "papo"):
        assert train_main(_flags(tiny_dir, data, "--algo", algo)) == 0
    for algo in ("cppo", "grpo", "papo"):  # one run each: one step line and one checkpoint
        run = tmp_path / "runs" / algo
        assert _steps(run) == [1] and [p.name for p in (run / "checkpoints").iterdir()] == ["step-000001"]
        assert parse_args(["--config", str(run / "config.yaml")]).algo == algo

    run = tmp_path / "runs" / "grpo"
    before = _snapshot(run)
    capsys.readouterr()
    import cppo.rl.run as run_mod

    with monkeypatch.context() as m:  # refused before any model loads
        m.setattr(run_mod, "build_policy", lambda *a, **k: pytest.fail("the model was loaded"))
        assert train_main(_flags(tiny_dir, data, "--algo", "grpo", "--seed", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds an earlier run" in err[0] and "--overwrite" in err[0], err
    assert _snapshot(run) == before  # untouched, down to the modification times


def test_overwrite_deletes_the_earlier_run_and_nothing_else(tiny_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(_flags(tiny_dir, data, "--output-dir", str(run), "--max-steps", "2")) == 0
    (run / "notes.txt").write_text("mine")  # not the run's: kept
    (run / "metrics.earlier-1.jsonl").write_text('{"step": 9}\n')  # the run's: deleted
    capsys.readouterr()
    assert train_main(_flags(tiny_dir, data, "--output-dir", str(run), "--overwrite", "--seed", "1")) == 0
    err = capsys.readouterr().err
    assert "--overwrite: deleted the earlier run's config.yaml, metrics.jsonl, rollouts.jsonl" in err
    assert _steps(run) == [1] and (run / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
    assert not (run / "metrics.earlier-1.jsonl").exists() and not (run / TRASH).exists()
    assert parse_args(["--config", str(run / "config.yaml")]).seed == 1
    # --resume auto still continues it; --resume auto with nothing to resume sets logs aside as before
    assert train_main(_flags(tiny_dir, data, "--output-dir", str(run), "--resume", "auto", "--seed", "1",
                             "--max-steps", "2")) == 0  # fmt: skip
    assert _steps(run) == [1, 2]


def test_an_overwrite_killed_midway_leaves_whole_files_and_the_next_one_finishes(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "model.safetensors").write_bytes(b"w" * 100)
    for name in ("config.yaml", "metrics.jsonl", "rollouts.jsonl"):
        (run / name).write_text(name)
    (run / "shapes").mkdir()
    import cppo.rl.rundir as rundir

    real, calls = rundir.os.replace, []

    def killed_after_two(src, dst):
        calls.append(src)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies between two renames
        real(src, dst)

    monkeypatch.setattr(rundir.os, "replace", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        clear_earlier_run(run)
    monkeypatch.setattr(rundir.os, "replace", real)
    moved = sorted(p.name for p in (run / TRASH).iterdir())
    assert (
        moved == ["config.yaml", "metrics.jsonl"]
        and (run / TRASH / "config.yaml").read_text() == "config.yaml"
    )
    assert [p.name for p in earlier_run(run)] == ["rollouts.jsonl", "checkpoints"]  # still refused
    assert (run / "checkpoints" / "step-000001" / "model.safetensors").read_bytes() == b"w" * 100
    assert clear_earlier_run(run) == ["rollouts.jsonl", "checkpoints"]
    assert sorted(p.name for p in run.iterdir()) == ["shapes"]


def test_dry_run_says_what_the_run_will_do_with_its_folder(tmp_path):
    run = tmp_path / "run"
    assert run_dir_line(parse_args(["--output-dir", str(run)])) == f"{run} (new)"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert "would be refused" in run_dir_line(parse_args(["--output-dir", str(run)]))
    assert "deleted once" in run_dir_line(parse_args(["--output-dir", str(run), "--overwrite"]))
    assert "resumed" in run_dir_line(parse_args(["--output-dir", str(run), "--resume", "auto"]))
