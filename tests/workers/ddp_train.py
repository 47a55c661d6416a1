"""Run by tests/test_rl_loop.py and tests/test_rl_fsdp.py under `torchrun`: train, then save this
rank's final weights (gathered in full when an accelerate FSDP config sharded the model).

torchrun --nproc_per_node 2 tests/workers/ddp_train.py OUT_FILE_PREFIX [cppo-train flags...]
"""

import os
import sys

import torch

from cppo.rl.flags import parse_args
from cppo.rl.fsdp import full_model_state, is_sharded
from cppo.rl.loop import run_training


def main(prefix: str, flags: list[str]) -> int:
    """Train with `flags`; write `{prefix}.rank{R}.pt` (the final weights); return this rank."""
    torch.set_num_threads(1)
    _, model = run_training(parse_args(flags))
    from accelerate import PartialState

    state = PartialState()
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    assert state.num_processes == expected, f"the loop ran {state.num_processes} process(es), not {expected}"
    rank = state.process_index
    assert is_sharded(model) == (os.environ.get("ACCELERATE_USE_FSDP") == "true" and expected > 1)
    weights = full_model_state(model, every_rank=True) if is_sharded(model) else model.state_dict()
    torch.save({k: v.detach().cpu() for k, v in weights.items()}, f"{prefix}.rank{rank}.pt")
    return rank


def exit_now() -> None:
    """End this worker at once, its results on disk, without the interpreter's teardown: torchrun
    workers torn down with a live gloo group aborted now and then in CI ('terminate called without
    an active exception', SIGABRT), which fails the launch whatever the run did."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    exit_now()
