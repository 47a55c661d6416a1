"""Two processes (gloo) choose the checkpoint to resume from (cppo.rl.resume.resume_point).

    torchrun --nproc_per_node 2 tests/workers/resume_ranks.py RUN_DIR OUT_PREFIX

Each process writes OUT_PREFIX.rank{R}.json: the checkpoint and step `--resume auto` gave it, and
what a `--resume` naming the checkpoint auto set aside raised on it. Used by
tests/test_bad_inputs_checkpoint.py: rank 0 alone verifies and moves; every rank takes its choice.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from cppo.rl.config import ConfigError, TrainConfig
from cppo.rl.resume import resume_point


def main(run_dir: Path, prefix: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ckpt, state = resume_point(TrainConfig(resume="auto", output_dir=str(run_dir)), run_dir, "fp", rank)
    dist.barrier()
    corrupt = sorted((run_dir / "checkpoints").glob("*.corrupt"))
    try:
        resume_point(TrainConfig(resume=str(corrupt[0]), output_dir=str(run_dir)), run_dir, "fp", rank)
        refused = None
    except ConfigError as e:
        refused = str(e)
    out = {"ckpt": str(ckpt), "step": int(state["step"]), "refused": refused}
    Path(f"{prefix}.rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
