"""Run by tests/test_fsdp_generation.py under `torchrun` with the FSDP environment: train as
ddp_train.py does, with the rows per `generate` call made to differ between the ranks, and record
what each rank's generation did.

torchrun --nproc_per_node 2 tests/workers/fsdp_generation.py MODE A,B OUT_FILE_PREFIX [cppo-train flags...]

MODE `rows`: rank 0 makes calls of A rows, rank 1 of B, bypassing the agreement (the rows are set
where the rollout decides them). MODE `memory`: rank 0 reads A bytes of free device memory, rank 1
B bytes, and the trainer sizes and agrees the rows itself.

Writes OUT_FILE_PREFIX.rank{R}.pt (final weights, gathered) and OUT_FILE_PREFIX.gen.rank{R}.pt: a
dict with `calls` (rows of each generate call), `inside` (collectives issued during each call),
`rollouts` (collectives issued during each collect_rollouts), `refused` (what generate_responses
and the rollout engine said to the sharded model outside `gathered`), `local` ((free bytes, bytes of one
row's KV cache, rows) of each memory sizing, before the agreement) and `agreed` (what the agreement
returned).
"""

import os
import sys

import torch
import torch.distributed as dist
from ddp_train import exit_now, main

import cppo.rl.generation as generation
import cppo.rl.loop as loop
import cppo.rl.rollout as rollout

# every collective FSDP2 and transformers' synced_gpus issue goes through one of these
COLLECTIVES = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
               "reduce_scatter_tensor", "all_gather", "broadcast", "barrier")  # fmt: skip


def count_collectives(counter: list[int]) -> None:
    """Wrap torch.distributed's collectives so that each call adds one to counter[0]."""
    for name in COLLECTIVES:
        real = getattr(dist, name, None)
        if real is None:
            continue

        def counting(*args, _real=real, **kw):
            counter[0] += 1
            return _real(*args, **kw)

        setattr(dist, name, counting)


if __name__ == "__main__":
    mode, (a, b), prefix, flags = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4:]
    rank = int(os.environ["RANK"])
    mine = int(a if rank == 0 else b)
    record = {"calls": [], "inside": [], "rollouts": [], "local": [], "agreed": [], "refused": None}
    counter = [0]
    count_collectives(counter)

    real_generate, real_engine = generation.generate_responses, generation.sample_groups

    def recording(real):
        def call(model, processor, batch, *args, **kw):
            before = counter[0]
            out = real(model, processor, batch, *args, **kw)
            record["calls"].append(out[0].shape[0])  # rows generated (the engine is given each prompt once)
            record["inside"].append(counter[0] - before)
            return out

        return call

    generation.generate_responses, generation.sample_groups = recording(real_generate), recording(real_engine)

    real_collect = loop.collect_rollouts

    def recording_collect(model, processor, *args, **kw):
        record["refused"] = []
        for real in (real_generate, real_engine):
            try:  # outside `gathered` a sharded model is refused before anything runs
                real(model, processor, {}, 1)
            except RuntimeError as e:
                record["refused"].append(str(e))
        before = counter[0]
        out = real_collect(model, processor, *args, **kw)
        record["rollouts"].append(counter[0] - before)
        return out

    loop.collect_rollouts = recording_collect

    if mode == "rows":  # this rank's own size, no agreement
        rollout.generation_rows = lambda model, cfg, prompt_length: mine
    elif mode == "memory":  # this rank's own free memory; the trainer sizes and agrees
        real_sized, real_agreed = generation.memory_sized_rows, generation.agreed_rows

        def sized(free_bytes, row_bytes):
            record["local"].append((free_bytes, row_bytes, real_sized(free_bytes, row_bytes)))
            return record["local"][-1][-1]

        def agreed(rows):
            record["agreed"].append(real_agreed(rows))
            return record["agreed"][-1]

        generation.free_device_memory = lambda device: mine
        generation.memory_sized_rows, generation.agreed_rows = sized, agreed
    else:
        raise SystemExit(f"unknown mode {mode!r}: use rows or memory")
    assert main(prefix, flags) == rank
    torch.save(record, f"{prefix}.gen.rank{rank}.pt")
    exit_now()
