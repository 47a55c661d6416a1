"""The runnable examples run, their loss is finite, and they change the parameters."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpl_plain_pytorch_example_runs_and_learns_something():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "cpl_plain_pytorch.py"), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"^step \d+ loss=(\S+)", out.stdout, flags=re.M)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), out.stdout
    cpl = [float(x) for x in re.findall(r" cpl=(\S+)", out.stdout)]
    assert all(math.isfinite(x) and x >= 0 for x in cpl)
    moved = float(re.search(r"max \|param - initial\| = (\S+)", out.stdout).group(1))
    assert moved > 0.0
