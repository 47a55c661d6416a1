"""Generation under FSDP2 on two CPU processes (gloo): ranks whose rows per generation call differ
both finish the step with the same weights, no collective runs inside a call (the default rollout
engine in the first test, transformers' `generate` in the second), and memory-sized rows are agreed
(the minimum over the ranks). Worker: tests/workers/fsdp_generation.py.

Before `synced_gpus=False` (cppo.models.inputs.generate_responses) the `rows` case hung: transformers
all-reduces once per new token for an FSDP-managed model, and the rank with more calls waited for
a partner that had moved on."""

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from cppo.models import load_model_and_processor
from tests.helpers import repo_pythonpath

REPO = Path(__file__).resolve().parents[1]
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true"}
FLAGS = [
    *("--max-steps", "1", "--prompts-per-step", "8", "--group-size", "2", "--micro-batch-size", "4"),
    *("--max-new-tokens", "8", "--lr", "1e-3", "--no-tensorboard", "--seed", "0", "--temperature", "1.0"),
    *("--algo", "grpo", "--beta", "0", "--seed-per-prompt", "--reward-weights", "1.0"),
    *("--rewards", str(REPO / "tests/workers/length_reward.py") + ":by_length"),  # a reward that varies
]
TIMEOUT_S = 180  # a run takes 10-25 s on 2 shared CPU cores; a hang fails here, not in CI


def _two_processes(tmp: Path, mode: str, per_rank: str, flags: list[str], port: int) -> list[dict]:
    """Run the worker on two processes; a hang is killed (the whole process group) after TIMEOUT_S.
    Returns each rank's {"weights": ..., **the worker's record}."""
    env = {**os.environ, **FSDP_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_pythonpath()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += [str(REPO / "tests" / "workers" / "fsdp_generation.py"), mode, per_rank, str(tmp / "two"), *flags]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # torchrun's workers run in sessions of their own, and a rank blocked in gloo ignores SIGTERM
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the two processes did not finish in {TIMEOUT_S} s (a hang):\n{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]
    return [
        {
            "weights": torch.load(tmp / f"two.rank{r}.pt", weights_only=True),
            **torch.load(tmp / f"two.gen.rank{r}.pt", weights_only=True),
        }
        for r in (0, 1)
    ]


def _assert_same_trained_weights(ranks: list[dict], tiny_dir) -> None:
    start = load_model_and_processor(tiny_dir)[0].state_dict()
    w0, w1 = ranks[0]["weights"], ranks[1]["weights"]
    assert set(w0) == set(w1) == set(start)
    for name in start:
        assert torch.equal(w0[name], w1[name]), f"ranks disagree on {name}"
    still = [n for n in start if torch.equal(w0[n], start[n])]
    # a real step: every language-model tensor moved; the vision tower is frozen (the default)
    assert still == [n for n in start if n.startswith("model.visual.")], still


def _flags(tiny_dir, data, tmp: Path) -> list[str]:
    return ["--model", str(tiny_dir), "--data", str(data), "--output-dir", str(tmp / "run"), *FLAGS]


@pytest.mark.slow
def test_ranks_with_8_and_4_rows_per_call_finish_with_the_same_weights(tiny_dir, data, tmp_path):
    """Rank 0 generates its 8 rows (4 prompts x 2) in one call, rank 1 in two calls of 4: both
    finish the step, with no collective inside any rollout-engine call (the gather happens around
    them: some collectives per rollout), and end with the same, trained weights."""
    ranks = _two_processes(tmp_path, "rows", "8,4", _flags(tiny_dir, data, tmp_path), 29687)
    assert [r["calls"] for r in ranks] == [[8], [4, 4]]
    assert [r["inside"] for r in ranks] == [[0], [0, 0]]
    assert all(r["rollouts"][0] > 0 for r in ranks)  # the counter sees FSDP's all-gathers
    for r in ranks:  # outside `gathered` the sharded model is refused with what to do, by either engine
        refusers = [m.split(" got a sharded model")[0] for m in r["refused"]]
        assert refusers == ["generate_responses", "sample_groups"]
        assert all("call it inside cppo.rl.fsdp.gathered(model)" in m for m in r["refused"])
    _assert_same_trained_weights(ranks, tiny_dir)


@pytest.mark.slow
def test_memory_sized_rows_are_the_minimum_over_the_ranks(tiny_dir, data, tmp_path):
    """Rank 0 reads 1 TiB free, rank 1 1 MiB. One row's KV cache is 1,024 bytes (this tiny model's
    float32 K and V: 2 x 2 layers x 2 KV heads x 32 dims x 4 bytes) per token of prompt + 8 new
    tokens; measured: rank 0's prompts 94 tokens (104,448 bytes a row: 256 rows, the cap), rank 1's
    90 (100,352 bytes: 512 KiB / 100,352 = 5 rows). Both take 5, rounded down to 2 groups of 2: each
    rank's 8 rows go in two calls of 4 (rank 0 alone would have made one call of 8)."""
    flags = [*_flags(tiny_dir, data, tmp_path), "--rollout-engine", "hf"]  # transformers' generate here
    ranks = _two_processes(tmp_path, "memory", f"{2**40},{2**20}", flags, 29688)
    ((free0, row0, rows0),), ((free1, row1, rows1),) = (r["local"] for r in ranks)  # one sizing each
    assert (free0, free1) == (2**40, 2**20)
    assert row0 % 1024 == 0 and row1 % 1024 == 0  # 1,024 bytes a token
    assert rows0 == 256  # capped
    assert rows1 == (2**20 // 2) // row1 and 4 <= rows1 < 8
    assert [r["agreed"] for r in ranks] == [[rows1], [rows1]]  # the minimum, on both ranks
    assert [r["calls"] for r in ranks] == [[4, 4], [4, 4]]
    assert [r["inside"] for r in ranks] == [[0, 0], [0, 0]]
    _assert_same_trained_weights(ranks, tiny_dir)
