"""Two processes: rank 1 comes to a collective later than --dist-timeout allows; rank 0 must stop.

    torchrun --nproc_per_node 2 tests/workers/dist_timeout.py OUT_PREFIX TIMEOUT_S LATE_S

The process group is started by cppo.rl.run.process_info (accelerate's PartialState, gloo on the
CPU) from a TrainConfig with dist_timeout=TIMEOUT_S. Rank 1 sleeps LATE_S first. Each process writes
OUT_PREFIX.rank{R}.json: how long its all-reduce waited, the error it raised and the line cppo-train
prints for it. Used by tests/test_dist_timeout.py.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist

from cppo.rl.config import TrainConfig
from cppo.rl.ranks import Whereabouts, collective_timeout_line
from cppo.rl.run import process_info


def main(prefix: str, timeout: float, late: float) -> None:
    cfg = TrainConfig(device="cpu", dist_timeout=timeout)
    rank, world, _ = process_info(cfg)
    out = {"world": world}
    if rank == 1:
        time.sleep(late)
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        out["error"] = None
    except RuntimeError as e:
        out["error"], out["line"] = (
            str(e),
            collective_timeout_line(
                e, cfg.dist_timeout, Whereabouts(rank, world, phase="the worker's all-reduce")
            ),
        )
    out["waited"] = time.monotonic() - t0
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump(out, f)
    os._exit(0)  # a group with a timed-out collective can hang in destroy_process_group


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
