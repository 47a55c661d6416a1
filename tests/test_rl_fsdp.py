"""FSDP: which accelerate settings turn it on and what an unusable one says; the sharded reference
(its log-probs equal an unsharded copy's) and sharded checkpoints (each rank writes its shards; they
resume in one process without FSDP, and under FSDP, as the run went on), on two CPU processes.

The sharded training itself is checked against one process in
tests/test_rl_loop.py::test_two_processes_equal_one_process_on_the_combined_batch[fsdp2]."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli.train import main as train_main
from cppo.models import load_model_and_processor
from cppo.rl.checkpoint import checkpoint_problem, load_trainer_state
from cppo.rl.config import ConfigError
from cppo.rl.fsdp import FSDPSettings, fsdp_settings
from cppo.rl.sharded import export_sharded
from tests.helpers import repo_pythonpath

REPO = Path(__file__).resolve().parents[1]


def test_no_fsdp_without_the_accelerate_flag(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert fsdp_settings() is None


def test_fsdp_version_1_is_refused_with_what_to_set(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="set fsdp_version: 2"):
        fsdp_settings()


def test_settings_follow_the_exported_fields(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    assert fsdp_settings() == FSDPSettings(reshard_after_forward=False, activation_checkpointing=True)


def test_the_example_accelerate_config_turns_fsdp2_on(tmp_path):
    """`accelerate launch` with examples/accelerate/fsdp2.yaml exports what fsdp_settings reads."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os\nfrom cppo.rl.fsdp import fsdp_settings\n"
        "print('SETTINGS', json.dumps(vars(fsdp_settings())))\n"
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "examples/accelerate/fsdp2.yaml")]
    env = {**os.environ, "PYTHONPATH": repo_pythonpath()}
    done = subprocess.run(
        [*cmd, "--num_processes", "1", str(probe)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("SETTINGS ")]
    assert json.loads(line.split(" ", 1)[1]) == vars(FSDPSettings())


# ------------------------------------------------- the sharded reference and sharded checkpoints

FLAGS = [
    *("--max-steps", "2", "--save-every", "1", "--keep-last", "0"),
    *("--prompts-per-step", "2", "--group-size", "2", "--micro-batch-size", "2"),
    *("--max-new-tokens", "8", "--lr", "1e-3", "--no-tensorboard", "--seed", "0", "--temperature", "1.0"),
    # --seed-per-prompt: one process draws what two drew; beta > 0: a reference, sharded under FSDP
    *("--algo", "cppo", "--cpl-gate", "none", "--seed-per-prompt", "--beta", "0.01"),
]
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}


def _torchrun(worker: str, prefix: Path, flags: list[str], port: int) -> None:
    env = {**os.environ, **FSDP_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_pythonpath()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += [str(REPO / "tests" / "workers" / worker), str(prefix), *flags]
    done = subprocess.run(cmd, env=env, cwd=REPO, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-6000:]


@pytest.fixture(scope="module")
def fsdp_run(tiny_dir, data, tmp_path_factory):
    """Two CPU processes (gloo) under FSDP2 train 2 steps with a reference (beta > 0), checkpointing
    each step, on data where half the prompts have no image (so that in some reference pass one rank
    has images and the other none). Returns (tmp folder, the cppo-train flags but --output-dir)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % 2:
            del row["image"]
    shutil.copytree(data.parent / "images", tmp / "images")  # images stay in the data folder
    mixed = tmp / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--model", str(tiny_dir), "--data", str(mixed), *FLAGS]
    _torchrun("fsdp_reference.py", tmp / "two", [*flags, "--output-dir", str(tmp / "run")], 29541)
    return tmp, flags


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_model_and_processor(ckpt)[0].state_dict()


def _resumable_copy(tmp: Path, name: str) -> Path:
    """A copy of the two-process run with its step-2 checkpoint removed: it resumes from step 1."""
    run = tmp / name
    shutil.copytree(tmp / "run", run)
    shutil.rmtree(run / "checkpoints" / "step-000002")
    return run


@pytest.mark.slow
def test_sharded_reference_log_probs_equal_the_unsharded_ones(fsdp_run):
    tmp, _ = fsdp_run
    passes = [torch.load(tmp / f"two.ref.rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [len(p) for p in passes] == [2, 2]  # one reference pass per step on each rank
    for rank_passes in passes:
        for p in rank_passes:
            assert p["is_sharded"] and p["local_numel"] * 2 == p["numel"]  # half the reference each
            torch.testing.assert_close(p["sharded"], p["plain"], atol=1e-6, rtol=0)
            assert p["sharded"].abs().sum() > 0
    # some step had images on one rank and none on the other: its vision blocks ran on a blank image
    assert any(bool(a["has_image"].any()) != bool(b["has_image"].any()) for a, b in zip(*passes))


@pytest.mark.slow
def test_sharded_checkpoints_hold_each_rank_shards_and_the_last_one_the_full_model(fsdp_run):
    tmp, _ = fsdp_run
    first, last = (tmp / "run" / "checkpoints" / f"step-00000{s}" for s in (1, 2))
    for ckpt in (first, last):
        assert checkpoint_problem(ckpt) is None
        files = json.loads((ckpt / "COMPLETE").read_text())["files"]
        assert {"shards/.metadata", "shards/__0_0.distcp", "shards/__1_0.distcp"} <= set(files)
        assert load_trainer_state(ckpt)["optimizer"] is None  # in the shards
    assert not list(first.glob("*.safetensors"))  # nothing gathered before the run's end
    final = torch.load(tmp / "two.rank0.pt", weights_only=True)
    for name, value in _weights(last).items():  # the end's export: from_pretrained, no FSDP
        torch.testing.assert_close(value, final[name], atol=0, rtol=0, msg=name)
    for rank in (0, 1):  # every rank knows the step is saved: none saves again alone (a SIGTERM's save)
        saves = torch.load(tmp / f"two.saves.rank{rank}.pt", weights_only=True)
        assert saves == [(1, str(first)), (2, str(last))]
    out = export_sharded(first, tmp / "exported")  # the CLI's export of a shards-only checkpoint
    assert not all(torch.equal(v, final[k]) for k, v in _weights(out).items())  # step 1, not 2


@pytest.mark.slow
def test_sharded_checkpoint_resumes_in_one_process_without_fsdp_as_the_run_went_on(fsdp_run, monkeypatch):
    """Step 1's shards (weights and AdamW moments) load into one unsharded process, whose step 2
    equals the two-process run's step 2 (one process draws what two drew: --seed-per-prompt)."""
    tmp, flags = fsdp_run
    for key in FSDP_ENV:
        monkeypatch.delenv(key, raising=False)
    run = _resumable_copy(tmp, "one")
    torch.set_num_threads(1)
    assert train_main([*flags, "--output-dir", str(run), "--resume", "auto"]) == 0
    ckpt = run / "checkpoints" / "step-000002"
    final = torch.load(tmp / "two.rank0.pt", weights_only=True)
    for name, value in _weights(ckpt).items():
        torch.testing.assert_close(value, final[name], atol=2e-5, rtol=1e-4, msg=name)
    state = load_trainer_state(ckpt)["optimizer"]["state"]
    assert all(int(s["step"]) == 2 for s in state.values())  # AdamW went on from the shards' step 1


@pytest.mark.slow
def test_sharded_checkpoint_resumes_under_fsdp_as_the_run_went_on(fsdp_run):
    tmp, flags = fsdp_run
    run = _resumable_copy(tmp, "again")
    _torchrun("ddp_train.py", tmp / "again", [*flags, "--output-dir", str(run), "--resume", "auto"], 29542)
    resumed = torch.load(tmp / "again.rank0.pt", weights_only=True)
    final = torch.load(tmp / "two.rank0.pt", weights_only=True)
    for name, value in resumed.items():
        torch.testing.assert_close(value, final[name], atol=0, rtol=0, msg=name)
