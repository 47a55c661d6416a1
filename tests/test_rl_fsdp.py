"""The FSDP switch: which accelerate settings turn it on, and what an unusable one says.

The sharded training itself is checked against one process in
tests/test_rl_loop.py::test_two_processes_equal_one_process_on_the_combined_batch[fsdp2]."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cppo.rl.config import ConfigError
from cppo.rl.fsdp import FSDPSettings, fsdp_settings

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
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [*cmd, "--num_processes", "1", str(probe)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("SETTINGS ")]
    assert json.loads(line.split(" ", 1)[1]) == vars(FSDPSettings())
