"""Hostile input to cppo-train and cppo-eval: one line on stderr naming the flag, field or file (with
its line), exit 2, no traceback, nothing written, and all of it before a model (or, for cppo-eval, a
processor or the data) is loaded: the loaders are replaced by ``pytest.fail`` (docs/reliability.md).

The corpus is built here from small files the test writes; tests/test_bad_inputs.py holds the
cppo-perturb and cppo-detect cases and cppo-train's reward specs, which are not repeated here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli.eval import main as eval_main
from cli.train import main as train_main
from tests.helpers import repo_pythonpath

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    """Bad config files, a file where a folder belongs, a folder, a FIFO, and an earlier run."""
    root = tmp_path_factory.mktemp("bad")
    files = {
        "dup.yaml": "lr: 1e-5\ngroup_size: 4\nlr: 2e-5\n",
        "dup_dash.yaml": "group_size: 4\ngroup-size: 5\n",
        "dup_alias.yaml": "lr: 1e-5\nlearning_rate: 2e-5\n",
        "syntax.yaml": "lr: 1e-5\n  group_size: [4\n",
        "rewards5.yaml": "rewards: 5\n",
        "lr_abc.yaml": "seed: 1\nlearning_rate: abc\n",
        "lr_nan.yaml": "lr: .nan\n",
        "weights.yaml": "reward_weights: [a, b]\n",
        "steps.yaml": "max_steps: 1.5\n",
        "seed_bool.yaml": "seed: true\n",
        "device.yaml": "device: tpu9\n",
        "empty_out.yaml": "output_dir: ''\n",
        "model_bool.yaml": "model: yes\n",
        "list.yaml": "- lr\n- seed\n",
        "preset_bad.yaml": "name: x\npreserving: [a\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "latin1.yaml").write_bytes(b"lr: 1e-5 # caf\xe9\n")
    (root / "a_file").write_text("x")
    (root / "folder").mkdir()
    (root / "no_config").mkdir()
    os.mkfifo(root / "fifo")
    earlier = root / "earlier"  # a run directory holding an earlier run
    (earlier / "checkpoints" / "step-000001").mkdir(parents=True)
    (earlier / "config.yaml").write_text("algo: cppo\n")
    (earlier / "metrics.jsonl").write_text('{"step": 1}\n')
    return root


TRAIN = [
    # numbers
    (["--seed", "-1"], "seed must be >= 0"),
    (["--seed", "nan"], "seed expects int"),
    (["--reward-weights", "nan", "nan"], "reward_weights must be finite"),
    (["--reward-weights", "inf", "1"], "reward_weights must be finite"),
    (["--reward-weights", "1"], "2 reward functions (accuracy, format) but 1 reward_weights"),
    (["--reward-weights", "1", "1", "1"], "but 3 reward_weights"),
    (["--reward-weights", "0", "0"], "reward_weights are all 0"),
    (["--temperature", "nan"], "temperature must be a number > 0"),
    (["--temperature", "inf"], "temperature must be a number > 0"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
    (["--top-p", "nan"], "top_p must be in (0, 1]"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--learning-rate", "nan"], "lr must be >= 0"),
    (["--learning-rate", "-1"], "lr must be >= 0"),
    (["--lr", "inf"], "lr must be >= 0"),
    (["--lerning-rate", "1e-5"], "did you mean --learning-rate"),
    (["--max-steps", "-1"], "max_steps must be >= 1"),
    (["--max-steps", "0"], "max_steps must be >= 1"),
    (["--group-size", "1"], "use --group-size 2 or more"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["--dual-clip", "nan"], "dual_clip must be > 1"),
    (["--cpl-tau", "inf"], "cpl_tau must be > 0"),
    (["--repetition-penalty", "inf"], "repetition_penalty must be > 0"),
    # the run directory and the device
    (["--output-dir", ""], "output_dir is empty"),
    (["--output-dir", "   "], "output_dir is empty"),
    (["--overwrite", "--resume", "auto"], "give --resume or --overwrite, not both"),
    (["--device", "tpu9"], "unknown device 'tpu9'; valid: auto, cpu, cuda"),
    (["--device", "cuda:1"], "unknown device 'cuda:1'"),
    (["--output-dir", "{d}/earlier", "--max-steps", "1"], "holds an earlier run (config.yaml, metrics.jsonl"),
    (
        ["--output-dir", "{d}/earlier", "--overwrite", "--model", "{d}/earlier/checkpoints/step-000001"],
        "--overwrite would delete",
    ),
    # config files
    (["--config", "{d}/dup.yaml"], "dup.yaml:3: duplicate key 'lr' (also on line 1)"),
    (["--config", "{d}/dup_dash.yaml"], "dup_dash.yaml:2: duplicate key 'group_size'"),
    (["--config", "{d}/dup_alias.yaml"], "dup_alias.yaml:2: duplicate key 'lr'"),
    (["--config", "{d}/syntax.yaml"], "syntax.yaml:2: not valid YAML"),
    (["--config", "{d}/rewards5.yaml"], "rewards5.yaml:1: rewards expects a list of str, got 5"),
    (["--config", "{d}/lr_abc.yaml"], "lr_abc.yaml:2: lr expects float, got 'abc'"),
    (["--config", "{d}/lr_nan.yaml"], "lr must be >= 0"),
    (["--config", "{d}/weights.yaml"], "weights.yaml:1: reward_weights expects a list of float"),
    (["--config", "{d}/steps.yaml"], "steps.yaml:1: max_steps expects int, got 1.5"),
    (["--config", "{d}/seed_bool.yaml"], "seed_bool.yaml:1: seed expects int, got True"),
    (["--config", "{d}/model_bool.yaml"], "model_bool.yaml:1: model expects str, got True"),
    (["--config", "{d}/device.yaml"], "unknown device 'tpu9'"),
    (["--config", "{d}/empty_out.yaml"], "output_dir is empty"),
    (["--config", "{d}/list.yaml"], "list.yaml: expected a mapping of config keys"),
    (["--config", "{d}/latin1.yaml"], "latin1.yaml: cannot read the config file"),
    (["--config", "{d}/missing.yaml"], "missing.yaml does not exist"),
    (["--config", "{d}/folder"], "is not a regular file"),
    (["--preset", "{d}/preset_bad.yaml"], "preset_bad.yaml:3: not valid YAML"),
]
if NO_CUDA:  # a CPU-only torch must not train on the CPU when asked for CUDA
    TRAIN.append((["--device", "cuda"], "device cuda: this torch"))


def _refused(main, argv: list[str], capsys) -> str:
    """Run `main`; exit 2 with exactly one stderr line and no traceback. Returns the line."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("argv, expected", TRAIN, ids=[" ".join(a) for a, _ in TRAIN])
def test_cppo_train_refuses_bad_input_before_the_model_loads(d, capsys, monkeypatch, argv, expected):
    import cppo.rl.run as run_mod

    monkeypatch.setattr(run_mod, "build_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(run_mod, "data_processor", lambda *a, **k: pytest.fail("the processor was loaded"))
    argv = [a.replace("{d}", str(d)) for a in argv]
    out = d / "out" / "train"
    if "--output-dir" not in argv and not argv[-1].endswith("empty_out.yaml"):  # a flag would win over it
        argv += ["--output-dir", str(out)]
    before = _tree(d / "earlier")
    assert expected in _refused(train_main, argv, capsys)
    assert not out.exists()
    assert _tree(d / "earlier") == before  # an earlier run is never touched by a refusal


EVAL = [
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--limit", "-1"], "--limit must be >= 1"),
    (["--samples", "0"], "--samples must be >= 1"),
    (["--samples", "-2"], "--samples must be >= 1"),
    (["--samples", "abc"], "--samples: invalid int value"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number >= 0"),
    (["--samples", "4", "--temperature", "0"], "4 copies of one greedy answer"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--min-image-side", "-1"], "--min-image-side must be >= 0"),
    (["--max-prompt-length", "0"], "--max-prompt-length must be >= 1"),
    (["--min-pixels", "1000", "--max-pixels", "10"], "--min-pixels 1000 is over --max-pixels 10"),
    (["--device", "tpu9"], "--device 'tpu9' is not a device torch knows"),
    (["--device", "mps"], "cppo-eval runs on cpu or cuda"),
    (["--device", "cuda:7" if NO_CUDA else f"cuda:{torch.cuda.device_count()}"], "--device cuda:"),
    (["--out", ""], "--out is empty"),
    (["--out", "{d}/a_file/eval.json"], "a_file is a file, not a folder"),
    (["--out", "{d}/a_file/deeper/eval.json"], "a_file is a file, not a folder"),
    (["--out", "{d}/folder"], "is a folder: give a file name"),
    (["--out", "{d}/fifo"], "exists and is not a regular file"),
    (["--out", "/sys/cppo-eval.json"], "cannot be written"),
    (["--model", "{d}/missing_model"], "does not exist"),
    (["--model", "{d}/no_config"], "has no config.json"),
    (["--data-columns", "image"], "--data-columns image: data columns: 'image' is not NAME=COLUMN"),
    (["--data-columns", "colour=picture"], "unknown name 'colour'"),
]
if NO_CUDA:
    EVAL.append((["--device", "cuda"], "this torch sees no CUDA device"))


@pytest.mark.parametrize("argv, expected", EVAL, ids=[" ".join(a) for a, _ in EVAL])
def test_cppo_eval_refuses_bad_input_before_any_work(d, capsys, monkeypatch, argv, expected):
    import cppo.models as models

    monkeypatch.setattr(models, "load_processor", lambda *a, **k: pytest.fail("the processor was loaded"))
    monkeypatch.setattr(
        models, "load_model_and_processor", lambda *a, **k: pytest.fail("the model was loaded")
    )
    argv = [a.replace("{d}", str(d)) for a in argv]
    out = d / "out" / "eval.json"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    before = _tree(d)
    line = _refused(eval_main, ["--data", str(d / "data.jsonl"), *argv], capsys)
    assert expected in line, line
    assert _tree(d) == before  # nothing written: no --out, no folder, no probe file left


def test_cppo_eval_without_data_is_one_line(capsys):
    assert "--data" in _refused(eval_main, ["--samples", "2"], capsys)


@pytest.fixture()
def fake_eval(monkeypatch):
    """cppo-eval with its loaders and evaluator replaced by stand-ins: only the writing is real."""
    import cppo.models as models
    import cppo.models.evaluate as evaluate_mod
    import cppo.models.prompt_tokens as prompt_tokens
    import cppo.rl.data as data_mod

    class Dataset:
        source, skipped, dropped = "fake", {}, {}

        def summary(self):
            return "1 sample"

    report = {"accuracy": 0.5, "n": 1, "questions": [{"responses": ["\\boxed{2}"]}]}
    monkeypatch.setattr(models, "model_path_or_demo", str)
    monkeypatch.setattr(models, "load_processor", lambda *a, **k: object())
    monkeypatch.setattr(models, "load_model_and_processor", lambda *a, **k: (object(), None))
    monkeypatch.setattr(prompt_tokens, "set_pixel_bounds", lambda *a, **k: None)
    monkeypatch.setattr(data_mod, "open_dataset", lambda *a, **k: Dataset())
    monkeypatch.setattr(evaluate_mod, "evaluate", lambda *a, **k: dict(report))
    monkeypatch.setattr(evaluate_mod, "format_table", lambda r: "table")
    return report


def test_cppo_eval_writes_atomically_and_a_full_disk_keeps_the_previous_file(
    fake_eval, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "new" / "sub" / "eval.json"
    argv = ["--data", "x.jsonl", "--model", "some-model", "--out", str(out)]
    assert eval_main(argv) == 0
    assert json.loads(out.read_text())["accuracy"] == 0.5 and json.loads(out.read_text())["data"] == "fake"
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.json"]  # no temporary sibling left
    before = out.read_bytes()
    capsys.readouterr()

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    assert eval_main([*argv, "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert "No space left on device" in err[-1] and "the previous file is unchanged" in err[-1], err
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.json"]
    fresh = tmp_path / "other" / "eval.json"  # no previous file: nothing, not even its folder, is left
    assert eval_main([*argv[:-1], str(fresh)]) == 2
    assert "nothing was written" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "other").exists()


def test_refusals_are_one_line_in_a_fresh_interpreter_too(d, tmp_path):
    """The same refusals from the installed entry points' code, run as a user would (python -m)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": repo_pythonpath()}
    cases = [
        (
            ["-m", "cli.train", "--config", str(d / "dup.yaml"), "--output-dir", str(tmp_path / "run")],
            "dup.yaml:3",
        ),
        (
            ["-m", "cli.eval", "--data", "x.jsonl", "--out", str(d / "a_file" / "eval.json")],
            "a_file is a file",
        ),
    ]
    for argv, expected in cases:
        p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=tmp_path)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and expected in lines[0], p.stderr
    assert list(tmp_path.iterdir()) == []


def test_max_new_tokens_over_the_models_positions_is_refused_before_the_model_loads(
    tmp_path, capsys, monkeypatch
):
    """The demo model has 2048 positions: a response that long could never follow a prompt."""
    import cppo.rl.run as run_mod

    monkeypatch.setattr(run_mod, "build_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    line = _refused(train_main, ["--max-new-tokens", "5000", "--output-dir", str(out)], capsys)
    assert "max_new_tokens 5000 leaves no room for a prompt in the model's 2048 positions" in line
    assert not (out / "metrics.jsonl").exists()
