"""Two processes (gloo) choose the checkpoint to resume from (cppo.rl.resume.resume_point).

    torchrun --nproc_per_node 2 tests/workers/resume_ranks.py RUN_DIR OUT_PREFIX

Each process writes OUT_PREFIX.rank{R}.json: the checkpoint and step `--resume auto` gave it, the
files it hashed for that choice (["step-000003", "config.json"], ...), and what a `--resume` naming
the checkpoint auto set aside raised on it, with the files it hashed for that. Used by
tests/test_bad_inputs_checkpoint.py: each process hashes its share; rank 0 alone moves; every rank
takes the same choice.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist
from ddp_train import exit_now

import cppo.rl.manifest as manifest_mod
from cppo.rl.config import ConfigError, TrainConfig
from cppo.rl.resume import resume_point

HASHED: list[list[str]] = []  # [checkpoint folder name, file] of every file this process hashed
_sha256 = manifest_mod.file_sha256


def _counted_sha256(path: Path) -> str:
    path = Path(path)
    ckpt = next(p for p in path.parents if p.name.startswith("step-"))
    HASHED.append([ckpt.name, str(path.relative_to(ckpt))])
    return _sha256(path)


def main(run_dir: Path, prefix: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    manifest_mod.file_sha256 = _counted_sha256
    ckpt, state = resume_point(TrainConfig(resume="auto", output_dir=str(run_dir)), run_dir, "fp", rank)
    hashed_auto = sorted(HASHED)
    dist.barrier()
    HASHED.clear()
    corrupt = sorted((run_dir / "checkpoints").glob("*.corrupt"))
    try:
        resume_point(TrainConfig(resume=str(corrupt[0]), output_dir=str(run_dir)), run_dir, "fp", rank)
        refused = None
    except ConfigError as e:
        refused = str(e)
    out = {"ckpt": str(ckpt), "step": int(state["step"]), "refused": refused}
    out |= {"hashed_auto": hashed_auto, "hashed_named": sorted(HASHED)}
    Path(f"{prefix}.rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    exit_now()
