"""Run by tests/test_rank_decisions.py under `torchrun`: a training whose ranks are fed different
evaluation accuracies and different skipped-update counts, to see that they still take every
decision that leads into a collective together (cppo.rl.ranks).

torchrun --nproc_per_node 2 tests/workers/rank_decisions.py MODE OUT_PREFIX [cppo-train flags...]

MODE "decisions": per rank and step (1-based), what `_evaluate` returns and whether the update reports a skip:

    step        1     2     3     4
    rank 0    0.25  0.50  0.75  0.75    skipped at steps 3 and 4 (on rank 0 only)
    rank 1    0.75  0.50  1.00  0.00

Each rank deciding on its own would save the best at steps 1, 2 on rank 0 but only 1 on rank 1, at
step 3 save on rank 1 only (its 1.00 beats its 0.75, and its step is not bad), and at step 4 stop
on rank 0 only. MODE "log_fails": rank 0's write of step 2's log lines fails (a full disk).
Writes OUT_PREFIX.rank{R}.json: the steps this rank saved and how its run ended.
"""

import json
import os
import sys

import torch
from ddp_train import exit_now

import cppo.rl.loop as loop
from cppo.rl.atomic import RunDirError
from cppo.rl.flags import parse_args
from cppo.rl.reporting import StepLogger
from cppo.rl.resume import Checkpointer

ACCURACY = {0: [0.25, 0.50, 0.75, 0.75], 1: [0.75, 0.50, 1.00, 0.00]}
SKIPPED_ON_RANK0 = {3, 4}


def main(mode: str, prefix: str, flags: list[str]) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    evals, updates, saves = [], [], []

    def evaluate(*args, **kwargs):
        evals.append(1)
        return {"eval/accuracy": ACCURACY[rank][len(evals) - 1], "eval/format": 1.0}

    real_update, real_save = loop.policy_update, Checkpointer.save

    def policy_update(*args, **kwargs):
        updates.append(1)
        metrics = real_update(*args, **kwargs)
        if mode == "decisions" and rank == 0 and len(updates) in SKIPPED_ON_RANK0:
            metrics["update/skipped_nonfinite"] = 1.0
        return metrics

    def save(self, step, sampler_state):
        saves.append(step)
        return real_save(self, step, sampler_state)

    real_log = StepLogger.step

    def log(self, step, *args):
        if rank == 0 and step == 2:
            raise RunDirError("cannot write runs/x/metrics.jsonl: [Errno 28] No space left on device")
        return real_log(self, step, *args)

    Checkpointer.save, loop.policy_update = save, policy_update
    if mode == "decisions":
        loop._evaluate = evaluate
    else:
        StepLogger.step = log
    try:
        loop.run_training(parse_args(flags))
        ended = "finished"
    except (loop.BadStepsError, RunDirError) as e:
        ended = f"{type(e).__name__}: {e}"
    with open(f"{prefix}.rank{rank}.json", "w") as f:
        json.dump({"saves": saves, "ended": ended, "steps": len(updates)}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    exit_now()
