"""A reward function that never returns, in a small run (4 prompts x 4 rollouts, short responses, no
evaluation at step 0): the step pays one --reward-timeout for it, not one per response (16), and
the run stops with one line naming the function and its file (exit 5) or, with
--drop-hung-rewards, goes on without it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import repo_pythonpath

REPO = Path(__file__).resolve().parents[1]
CHAOS = REPO / "tests" / "workers" / "chaos_reward.py"
TIMEOUT = 3.0
ROWS = 16  # rollouts a step
SMALL = ["--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "16", "--eval-at-start", "false"]


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--output-dir", str(out), "--no-tensorboard", "--reward-timeout", str(TIMEOUT), *SMALL]
    flags += ["--rewards", "accuracy", "format", f"{CHAOS}:never", "--reward-weights", "0.9", "0.1", "0.0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_pythonpath(), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "cli.train", *flags, *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, timeout=600, capture_output=True, text=True)


def _steps(out: Path) -> list[dict]:
    """The training steps' metrics (an evaluation before step 1 would be a line of its own, step 0)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] >= 1]


@pytest.mark.slow
def test_a_reward_that_never_returns_stops_the_run_after_one_timeout(tmp_path):
    done = _train(tmp_path / "run", "--reward-hang-steps", "1", "--max-steps", "3")
    assert done.returncode == 5, done.stderr[-3000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("cppo-train: error: reward function never (") and f"{CHAOS}:" in line
    assert "--reward-timeout 3 s" in line and "--drop-hung-rewards" in line
    (step,) = _steps(tmp_path / "run")  # the step was logged, then the run stopped
    assert step["reward/hung/never"] == 1.0 and step["reward/errors"] == ROWS
    assert TIMEOUT <= step["time/reward"] < TIMEOUT + 2.0  # one timeout, not 16 (48 s)
    errors = (tmp_path / "run" / "reward_errors.jsonl").read_text().splitlines()
    assert len(errors) == ROWS and "TimeoutError" in json.loads(errors[0])["error"]


@pytest.mark.slow
def test_with_drop_hung_rewards_the_run_goes_on_without_it(tmp_path):
    done = _train(tmp_path / "run", "--reward-hang-steps", "1", "--drop-hung-rewards", "--max-steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 1: dropped reward function never (" in done.stderr
    first, second = _steps(tmp_path / "run")
    assert first["reward/hung/never"] == 1.0 and TIMEOUT <= first["time/reward"] < TIMEOUT + 2.0
    assert second["reward/hung/never"] == 0.0 and second["reward/errors"] == 0.0
    assert second["time/reward"] < 2.0  # not called any more
