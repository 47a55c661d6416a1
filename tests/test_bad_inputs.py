"""Hostile input to the commands: one line on stderr naming the problem, exit 2, no traceback, and
nothing written (docs/reliability.md). The corpus is built here from small files the test writes.

cppo-perturb and cppo-detect, and the reward specs of cppo-train; each case is (argv, a piece of the expected
message). The rest of the corpus: tests/test_bad_inputs_train_eval.py, _data.py and _checkpoint.py.
"""

import os
from pathlib import Path

import pytest
import torch

from cli.detect import main as detect_main
from cli.perturb import main as perturb_main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files of every kind a user may hand over, and one good image."""
    from PIL import Image

    root = tmp_path_factory.mktemp("bad")
    good = root / "good.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(good)
    (root / "text.png").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.png").write_bytes(good.read_bytes()[:40])
    (root / "folder.png").mkdir()
    os.mkfifo(root / "fifo.png")
    (root / "a_file").write_text("x")
    (root / "bad.yaml").write_text("name: x\npreserving: [a\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "keys.yaml").write_text("name: x\nfoo: 1\n")
    return root


PERTURB = [
    (["--columns", "0"], "--columns must be >= 1"),
    (["--columns", "-3"], "--columns must be >= 1"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--out", ""], "--out is empty"),
    (["--image", "{d}/missing.png"], "image not found"),
    (["--image", "{d}/text.png"], "cannot read image"),
    (["--image", "{d}/empty.png"], "cannot read image"),
    (["--image", "{d}/truncated.png"], "cannot read image"),
    (["--image", "{d}/folder.png"], "not a regular file"),
    (["--image", "{d}/fifo.png"], "not a regular file"),
    (["--preset", "nope"], "nope"),
    (["--preset", "{d}/bad.yaml"], "bad.yaml:3: not valid YAML"),
    (["--preset", "{d}/list.yaml"], "expected a YAML mapping"),
    (["--preset", "{d}/keys.yaml"], "keys.yaml"),
    (["--out", "{d}/a_file"], "exists and is not a directory"),
    (["--out", "{d}/a_file/sub"], "cannot be written"),
]

DETECT = [
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--max-report", "-1"], "--max-report must be >= 0"),
    (["--draws", "0"], "--draws"),
    (["--batch-size", "0"], "--batch-size"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--top-percent", "0"], "--top-percent"),
    (["--top-percent", "1.5"], "--top-percent"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "0"], "--temperature"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--out", ""], "--out is empty"),
    (["--device", "tpu9"], "not a device torch knows"),
    (["--device", "cuda:7" if not torch.cuda.is_available() else "mps"], "--device"),
    (["--preset", "{d}/bad.yaml"], "bad.yaml:3: not valid YAML"),
    (["--perturbation", "nope"], "nope"),
    (["--image", "{d}/missing.png", "--prompt", "q"], "image not found"),
    (["--image", "{d}/text.png", "--prompt", "q"], "cannot read image"),
    (["--image", "{d}/folder.png", "--prompt", "q"], "not a regular file"),
    (["--image", "{d}/fifo.png", "--prompt", "q"], "not a regular file"),
    (["--image", "{d}/good.png"], "--image needs --prompt"),
    (["--prompt", "q"], "--prompt needs --image"),
    (["--image", "{d}/good.png", "--prompt", "  "], "the prompt is empty"),
    (["--data", "{d}/missing.jsonl"], "missing.jsonl"),
    (["--model", "{d}/folder.png"], "folder.png"),
    (["--out", "{d}/a_file"], "exists and is not a folder"),
    (["--out", "{d}/a_file/sub"], "cannot be written"),
]


def _run(main, argv, d: Path, capsys) -> str:
    argv = [a.replace("{d}", str(d)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(d / "out" / "never")]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, code, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, lines
    assert not (d / "out" / "never").exists()  # nothing written before the refusal
    return lines[0]


@pytest.mark.parametrize("argv, expected", PERTURB, ids=[" ".join(a) for a, _ in PERTURB])
def test_cppo_perturb_refuses_bad_input_with_one_line(files, capsys, argv, expected):
    assert expected in _run(perturb_main, argv, files, capsys)


@pytest.mark.parametrize("argv, expected", DETECT, ids=[" ".join(a) for a, _ in DETECT])
def test_cppo_detect_refuses_bad_input_with_one_line(files, capsys, argv, expected):
    assert expected in _run(detect_main, argv, files, capsys)


def test_a_write_that_fails_leaves_the_previous_output(tmp_path, capsys, monkeypatch):
    """cppo-perturb into a folder it already wrote: a failing write (a full disk here) changes nothing."""
    from PIL import Image

    out = tmp_path / "out"
    assert perturb_main(["--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    capsys.readouterr()
    assert perturb_main(["--out", str(out), "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "nothing was changed" in err[0]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


TRAIN_REWARDS = [
    (["--rewards", "{d}/missing.py:f"], "does not exist"),
    (["--rewards", "no_such_module_xyz:f"], "cannot import module"),
    (["--rewards", "os:no_such_function"], "has no function"),
    (["--rewards", "{d}/syntax.py:f"], "SyntaxError"),
    (["--rewards", "{d}/raises.py:f"], "RuntimeError: boom at import"),
    (["--rewards", "accurracy"], "unknown reward 'accurracy'"),
]


@pytest.mark.parametrize("argv, expected", TRAIN_REWARDS, ids=[" ".join(a) for a, _ in TRAIN_REWARDS])
def test_cppo_train_refuses_a_bad_reward_before_the_model_loads(files, capsys, monkeypatch, argv, expected):
    """A reward that cannot be used is one line, exit 2, before any model loads or file is written."""
    import cppo.rl.run as run_mod
    from cli.train import main as train_main

    (files / "syntax.py").write_text("def f(:\n")
    (files / "raises.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.setattr(run_mod, "build_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    out = files / "out" / "train"
    argv = [a.replace("{d}", str(files)) for a in argv]
    code = train_main([*argv, "--reward-weights", "1", "--output-dir", str(out), "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    assert expected in err.splitlines()[-1], err
    assert not out.exists()
