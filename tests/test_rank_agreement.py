"""A stage only rank 0 runs (writing config.yaml, creating a checkpoint folder) ends the same way on
every process: when rank 0 fails, the others raise too instead of waiting in the next collective
(a hang on NCCL, a 30-minute timeout on gloo)."""

import os

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from cppo.rl.atomic import RunDirError
from cppo.rl.sharded import share_rank0_outcome


def _worker(rank: int, init: str, rank0_fails: bool, results) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    error = OSError(28, "No space left on device") if rank0_fails and rank == 0 else None
    try:
        share_rank0_outcome(error, "write runs/x/config.yaml")
        results[rank] = "ok"
    except (OSError, RuntimeError) as e:
        results[rank] = f"{type(e).__name__}: {e}"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rank0_fails", [False, True])
def test_every_rank_stops_when_rank_0_could_not_write(tmp_path, rank0_fails):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(f"file://{tmp_path / 'store'}", rank0_fails, results), nprocs=2)
    if not rank0_fails:
        assert dict(results) == {0: "ok", 1: "ok"}
    else:
        assert results[0].startswith("OSError") and "No space left" in results[0]
        assert results[1].startswith(RunDirError.__name__), results[1]
        assert "rank 0 could not write runs/x/config.yaml" in results[1]
