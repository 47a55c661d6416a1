"""Run by tests/test_fsdp_kill.py under `torchrun`: a two-process FSDP run in which one process is
killed with SIGKILL at a chosen point, as a crashed node or the OOM killer would do it.

    CPPO_TEST_KILL=RANK:WHERE:STEP torchrun --nproc_per_node 2 tests/workers/fsdp_kill.py PREFIX [flags]

WHERE is `reward` (the step's reward phase, between its generation and its update: mid-step) or
`shards` (the moment that step's sharded checkpoint starts writing this process's shards). Without
CPPO_TEST_KILL it is tests/workers/ddp_train.py: train, then write OUT_PREFIX.rank{R}.pt.
"""

import os
import signal
import sys

from ddp_train import exit_now
from ddp_train import main as train

import cppo.rl.rewards as rewards_mod
import cppo.rl.sharded as sharded_mod


def _kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(rank: int, where: str, step: int) -> None:
    """Kill this process (when it is `rank`) at `where` of step `step` (1-based)."""
    if int(os.environ["RANK"]) != rank:
        return
    if where == "reward":  # the scorer runs once per step on every process
        calls = []
        real = rewards_mod.RewardScorer.__call__

        def scored(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == step:
                _kill_self()
            return real(self, *args, **kwargs)

        rewards_mod.RewardScorer.__call__ = scored
    elif where == "shards":  # --save-every 1: the step-th save writes step `step`'s checkpoint
        saves = []
        real = sharded_mod.write_shards

        def write(directory, model, optimizer):
            saves.append(1)
            if len(saves) == step:
                _kill_self()
            return real(directory, model, optimizer)

        sharded_mod.write_shards = write
    else:
        raise ValueError(f"CPPO_TEST_KILL: unknown point {where!r}: reward or shards")


if __name__ == "__main__":
    if spec := os.environ.get("CPPO_TEST_KILL"):
        rank, where, step = spec.split(":")
        arm(int(rank), where, int(step))
    train(sys.argv[1], sys.argv[2:])
    exit_now()
