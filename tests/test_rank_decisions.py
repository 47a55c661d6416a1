"""Ranks that always agree (cppo/rl/ranks.py): metrics over every rank's rows, decisions taken once,
rank 0's failures raised on every rank; and the training loop's use of them under FSDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from cppo.rl.atomic import RunDirError
from cppo.rl.ranks import Tally, rank0_stage, rank0s
from tests.helpers import repo_pythonpath

REPO = Path(__file__).resolve().parents[1]

# one step's rows on one process: (response length, reward); split 3 + 1 over two processes
ROWS = [(4, 1.0), (6, 0.0), (2, 0.5), (8, 1.0)]


def _tally(rows, step_time: float, micro: list[float]) -> Tally:
    t = Tally()
    t.mean("response/length", sum(n for n, _ in rows), len(rows))
    t.mean("reward/total", sum(r for _, r in rows), len(rows))
    t.count("reward/errors", sum(r == 0.0 for _, r in rows))
    t.max("time/step", step_time)
    t.mean("grpo/pg_loss", sum(micro), len(micro))  # a mean over micro-batches
    return t


def test_a_tally_of_two_parts_is_the_tally_of_the_whole():
    whole = _tally(ROWS, 2.0, [0.25, -0.5, 1.0]).values()
    # (4 + 6 + 2 + 8) / 4 = 5 rows' mean, not the mean of the parts' means (4, 8) = 6
    assert whole == {
        "response/length": 5.0,
        "reward/total": 0.625,
        "grpo/pg_loss": 0.25,
        "reward/errors": 1.0,
        "time/step": 2.0,
    }
    merged = _tally(ROWS[:3], 2.0, [0.25, -0.5])
    merged.merge(_tally(ROWS[3:], 3.0, [1.0]))
    assert merged.values() == {**whole, "time/step": 3.0}  # the slowest part's time
    empty = Tally()
    empty.mean("cpl/d_pos", 0.0, 0)
    assert empty.values() == {"cpl/d_pos": 0.0}


def _worker(rank: int, init: str, results) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        mine = _tally(ROWS[:3], 2.0, [0.25, -0.5]) if rank == 0 else _tally(ROWS[3:], 3.0, [1.0])
        if rank == 1:
            mine.mean("cpl/acc", 0.5, 1)  # a key only one rank has
        gathered = mine.over_ranks(2).values()
        decided = rank0s({"eval/accuracy": 0.5 + rank}, 2)  # each rank its own accuracy: rank 0's wins
        outcome = []
        for failing in (None, 1, 0):
            try:
                with rank0_stage("write metrics.jsonl", 2):
                    if rank == failing:
                        raise OSError(28, "No space left on device")
                outcome.append("ok")
            except OSError as e:
                outcome.append(f"{type(e).__name__}: {e}")
        results[rank] = (gathered, decided, outcome)
    finally:
        dist.destroy_process_group()


def test_two_processes_gather_the_same_metrics_and_take_rank_0s_decisions(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}", results), nprocs=2)
    (g0, d0, o0), (g1, d1, o1) = results[0], results[1]
    whole = _tally(ROWS, 3.0, [0.25, -0.5, 1.0]).values()
    assert g0 == g1 == {**whole, "cpl/acc": 0.5}
    assert d0 == d1 == {"eval/accuracy": 0.5}
    # rank 1's own failure is its own; rank 0's is raised on every rank
    assert o0[:2] == ["ok", "ok"] and o1[:2] == ["ok", "OSError: [Errno 28] No space left on device"]
    assert o0[2] == "OSError: [Errno 28] No space left on device"
    assert o1[2].startswith(RunDirError.__name__) and "rank 0 could not write metrics.jsonl" in o1[2]


def _train_two(tmp_path, tiny_dir, data, mode: str, *extra: str) -> list[dict]:
    """tests/workers/rank_decisions.py MODE under torchrun, 2 processes sharded by FSDP (every
    checkpoint save is a collective); each rank's saves and ending."""
    flags = [
        *("--model", str(tiny_dir), "--data", str(data), "--output-dir", str(tmp_path / "run")),
        *("--prompts-per-step", "2", "--group-size", "2", "--micro-batch-size", "2"),
        *("--max-new-tokens", "4", "--no-tensorboard", "--algo", "grpo", "--beta", "0", *extra),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo_pythonpath()}
    env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="true")
    worker = str(REPO / "tests" / "workers" / "rank_decisions.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29631"]
    cmd += [worker, mode, str(tmp_path / "r"), *flags]
    done = subprocess.run(cmd, env=env, cwd=REPO, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-9000:]
    return [json.loads((tmp_path / f"r.rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ranks_fed_different_accuracies_and_skips_take_the_same_decisions(tiny_dir, data, tmp_path):
    """The ranks get different evaluation accuracies and only rank 0 reports skipped updates
    (tests/workers/rank_decisions.py has the table). Both follow rank 0: the best checkpoint at steps
    1 and 2, no save at step 3 (a bad step, although rank 1's accuracy rose), and both stop at step 4
    (max_bad_steps 2) instead of one waiting in a save (each rank on its own: a hang)."""
    extra = ("--max-steps", "4", "--eval-every", "1", "--keep-best", "--keep-last", "0")
    extra += ("--max-bad-steps", "2")
    for r in _train_two(tmp_path, tiny_dir, data, "decisions", *extra):
        assert r["saves"] == [1, 2] and r["steps"] == 4, r
        assert r["ended"].startswith("BadStepsError: stopped at step 4: 2 consecutive steps"), r["ended"]
    out = tmp_path / "run"
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    assert (best["step"], best["score"]) == (2, 0.5)  # rank 0's accuracy, not rank 1's 0.75 at step 1
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000001", "step-000002"]
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["eval/accuracy"] for m in logged] == [0.25, 0.5, 0.75, 0.75]
    assert [m["update/bad_streak"] for m in logged] == [0.0, 0.0, 1.0, 2.0]


@pytest.mark.slow
def test_a_log_write_that_fails_on_rank_0_stops_every_rank(tiny_dir, data, tmp_path):
    """Rank 0 alone writes the logs; its full disk at step 2 stops rank 1 too, with a line naming it,
    before any save of step 2 (rank 1 on its own would wait for rank 0 in the next collective)."""
    r0, r1 = _train_two(tmp_path, tiny_dir, data, "log_fails", "--max-steps", "3", "--save-every", "1")
    assert r0["saves"] == r1["saves"] == [1] and r0["steps"] == r1["steps"] == 2
    assert r0["ended"] == "RunDirError: cannot write runs/x/metrics.jsonl: [Errno 28] No space left on device"
    assert r1["ended"].startswith("RunDirError: rank 0 could not write the step's logs: RunDirError: cannot")
