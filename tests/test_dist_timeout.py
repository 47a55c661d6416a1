"""--dist-timeout: validated, handed to the process group cppo-train starts, and a collective that
outlives it ends with one line naming the option (exit 4) instead of a hang.

Two gloo processes under torchrun (tests/workers/dist_timeout.py): rank 1 reaches an all-reduce
LATE seconds after rank 0, with --dist-timeout TIMEOUT < LATE. Without the timeout reaching the group
(torch's default: 30 min for gloo, 10 for NCCL) rank 0 would wait the LATE seconds and succeed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cppo.rl.loop as loop_mod
from cli.train import main as train_main
from cppo.rl.config import ConfigError
from cppo.rl.flags import parse_args
from cppo.rl.ranks import collective_timeout_line
from tests.helpers import repo_pythonpath

REPO = Path(__file__).resolve().parents[1]
TIMEOUT, LATE = 2.0, 8.0
GLOO_TIMEOUT = "[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 2000ms for recv"


@pytest.mark.parametrize("value", ["0", "-5", "inf", "nan"])
def test_a_timeout_that_is_not_a_positive_number_is_refused(value):
    with pytest.raises(ConfigError, match=f"dist_timeout must be a number of seconds > 0, got {value}"):
        parse_args(["--dist-timeout", value])
    assert parse_args([]).dist_timeout == 3600.0  # the default (its doc says why)


def test_a_collective_past_the_timeout_stops_with_a_line_naming_the_option(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_pythonpath()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29671"]
    cmd += [str(REPO / "tests" / "workers" / "dist_timeout.py"), str(tmp_path / "out")]
    cmd += [str(TIMEOUT), str(LATE)]
    done = subprocess.run(cmd, env=env, cwd=REPO, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    first = json.loads((tmp_path / "out.rank0.json").read_text())
    assert first["world"] == 2
    assert "Timed out waiting 2000ms" in first["error"]  # the group's timeout is the option's 2 s
    assert TIMEOUT - 0.5 < first["waited"] < LATE - 3  # stopped near the bound, long before rank 1 came
    want = "a collective between the processes waited longer than --dist-timeout (2 s) on rank 0 of 2, in "
    assert first["line"].startswith(want + "the worker's all-reduce (Timed out waiting 2000ms for recv")
    assert "raise --dist-timeout" in first["line"]
    late = json.loads((tmp_path / "out.rank1.json").read_text())
    assert late["error"] is not None  # its peer has gone: it stops too, not waits


def test_cppo_train_prints_the_line_and_exits_4(monkeypatch, capsys):
    def times_out(cfg):
        raise RuntimeError(GLOO_TIMEOUT)

    monkeypatch.setattr(loop_mod, "train", times_out)
    assert train_main(["--dist-timeout", "7.5"]) == 4
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("cppo-train: error: a collective between the processes waited longer than ")
    assert "--dist-timeout (7.5 s)" in line


def test_other_runtime_errors_are_not_taken_for_a_timeout():
    assert collective_timeout_line(RuntimeError("CUDA out of memory"), 10) is None
    assert collective_timeout_line(ValueError(GLOO_TIMEOUT), 10) is None
    assert collective_timeout_line(RuntimeError(GLOO_TIMEOUT), 10) is not None


def test_a_timeout_in_a_step_names_the_rank_the_step_and_the_phase(monkeypatch, capsys, tmp_path):
    """A collective of the update of step 1 that times out (its error raised where the loop's
    all-reduce would raise it): exit 4, and the line says where this process was."""

    def times_out(*args, **kwargs):
        raise RuntimeError(GLOO_TIMEOUT)

    monkeypatch.setattr(loop_mod, "policy_update", times_out)
    flags = ["--max-steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4"]
    assert train_main([*flags, "--output-dir", str(tmp_path / "run"), "--no-tensorboard"]) == 4
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error" in x]  # the progress bar aside
    assert line.startswith("cppo-train: error: a collective between the processes waited longer than ")
    assert "on rank 0 of 1, in the policy update of step 1 (Timed out waiting 2000ms for recv)" in line
