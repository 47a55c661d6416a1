"""A process of a two-process FSDP run killed with SIGKILL (a crashed node, the OOM killer): the launcher
ends the other, nothing half-written is taken for a checkpoint, and `--resume auto` under FSDP goes on
to the same weights and metrics as the uninterrupted run (docs/reliability.md). Two CPU processes, gloo.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cppo.rl.checkpoint import latest_checkpoint
from tests.helpers import repo_pythonpath

REPO = Path(__file__).resolve().parents[1]
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}
STEPS = 3
FLAGS = [
    *("--max-steps", str(STEPS), "--save-every", "1", "--keep-last", "0"),
    *("--prompts-per-step", "2", "--group-size", "2", "--micro-batch-size", "2"),
    *("--max-new-tokens", "8", "--lr", "1e-3", "--no-tensorboard", "--seed", "0", "--temperature", "1.0"),
    *("--algo", "cppo", "--cpl-gate", "none", "--seed-per-prompt"),
]
VOLATILE = ("time/", "memory/", "throughput/")


def _torchrun(
    prefix: Path, flags: list[str], port: int, kill: str | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, **FSDP_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_pythonpath()}
    env.pop("CPPO_TEST_KILL", None)
    if kill:
        env["CPPO_TEST_KILL"] = kill
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += [str(REPO / "tests" / "workers" / "fsdp_kill.py"), str(prefix), *flags]
    return subprocess.run(cmd, env=env, cwd=REPO, timeout=400, capture_output=True, text=True)


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir, data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_kill")
    flags = ["--model", str(tiny_dir), "--data", str(data), *FLAGS]
    done = _torchrun(tmp / "reference", [*flags, "--output-dir", str(tmp / "reference")], 29561)
    assert done.returncode == 0, done.stderr[-6000:]
    return tmp, flags


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill", "port", "last_complete"),
    [
        ("0:reward:2", 29562, 1),  # rank 0, mid-step 2 (after its generation, before its update)
        ("1:shards:2", 29563, 1),  # rank 1, as step 2's sharded checkpoint starts writing its shards
    ],
)
def test_a_killed_rank_ends_the_launch_and_the_run_resumes_to_the_uninterrupted_one(
    uninterrupted, kill, port, last_complete
):
    tmp, flags = uninterrupted
    name = kill.replace(":", "-")
    run = tmp / name
    killed = _torchrun(tmp / name, [*flags, "--output-dir", str(run)], port, kill=kill)
    assert killed.returncode != 0, "the launch went on after a process was killed"
    assert "Signal 9 (SIGKILL)" in killed.stderr or "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert not (tmp / f"{name}.rank0.pt").exists() and not (tmp / f"{name}.rank1.pt").exists()
    ckpts = run / "checkpoints"
    assert latest_checkpoint(run).name == f"step-{last_complete:06d}"  # step 2's was never completed
    assert not (ckpts / f"step-{last_complete + 1:06d}").exists()  # half-written: only a .tmp- folder, if any

    resumed = _torchrun(
        tmp / f"{name}-resumed", [*flags, "--output-dir", str(run), "--resume", "auto"], port + 10
    )
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert not list(ckpts.glob(".tmp-*")), "the killed save's temporary folder was left"
    assert _metrics(run) == _metrics(tmp / "reference")
    want = torch.load(tmp / "reference.rank0.pt", weights_only=True)
    got = torch.load(tmp / f"{name}-resumed.rank0.pt", weights_only=True)
    assert got.keys() == want.keys()
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], atol=0, rtol=0, msg=key)
