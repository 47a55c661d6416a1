"""What the processes of a run agree on after the update, and how: metrics over every rank's rows,
decisions taken once.

    tally = Tally(); tally.mean("response/length", total, rows); tally.max("time/step", t)
    metrics = tally.over_ranks(world).values()   # the whole step's, the same dict on every rank
    metrics = rank0s(metrics, world)             # every decision below reads rank 0's copy
    with rank0_stage("write the step's logs", world): logger.step(...)   # rank 0 failed: all raise

Metrics. Each process holds 1/world of the step's rows, so a mean of its own rows is not the step's.
A metric is kept as parts that add up over processes (a mean as its sum and its weight, a count,
a maximum), the parts of every process are gathered in one collective, and each process combines
them in rank order: the same floats in the same order, hence the same dict on every rank. A mean
over rows stays a mean over the step's rows (weights: each rank's rows), a mean over micro-batches
a mean over every rank's micro-batches (weights: their counts), so two processes log what one
process logs on the same rows when their micro-batch boundaries agree.

Decisions. Everything that leads into a collective (keep_best's save, the early stop after
max_bad_steps, the skip of a bad step's save, an error) is taken from one copy of the metrics:
rank 0's, broadcast (`rank0s`), even though the gathered metrics already agree, so that a
difference in anything a rank computes on its own (an evaluation in bf16, a future metric that is
not gathered) cannot send one rank into a save the others skip. A stage only rank 0 runs (the
log files, best.json, an unsharded checkpoint) shares its outcome (`rank0_stage`): when it fails on
rank 0 every process raises, instead of the others waiting in the next collective.
"""

from __future__ import annotations

import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cppo.rl.sharded import share_rank0_outcome


def collective_device(group=None) -> torch.device:
    """Where a small tensor for a collective of `group` must live: the current GPU when the group's
    backend has NCCL (also accelerate's mixed `cuda:nccl,cpu:gloo`), the CPU under gloo."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass
class Tally:
    """Metrics as parts that add up over processes: means (sum and weight), counts (sums), maxima."""

    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # a mean's numerator
    weights: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # ... its denominator
    counts: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    maxima: dict[str, float] = field(default_factory=dict)

    def mean(self, key: str, total: float, weight: float) -> None:
        """`key` is a mean: add `total` to its numerator and `weight` to its denominator."""
        self.sums[key] += float(total)
        self.weights[key] += float(weight)

    def count(self, key: str, n: float) -> None:
        """`key` is a count: summed over processes."""
        self.counts[key] += float(n)

    def max(self, key: str, value: float) -> None:
        """`key` is a maximum over processes (a peak, the slowest rank's time)."""
        self.maxima[key] = max(self.maxima.get(key, float(value)), float(value))

    def merge(self, other: Tally) -> None:
        for k in other.sums:
            self.mean(k, other.sums[k], other.weights[k])
        for k, n in other.counts.items():
            self.count(k, n)
        for k, v in other.maxima.items():
            self.max(k, v)

    def values(self) -> dict[str, float]:
        """The metrics: each mean's sum / weight (0 where the weight is 0), counts, maxima."""
        out = {k: self.sums[k] / self.weights[k] if self.weights[k] else 0.0 for k in self.sums}
        return {**out, **self.counts, **self.maxima}

    def over_ranks(self, world: int) -> Tally:
        """Every process's tally added up, in rank order (one all_gather of small dicts; keys a rank
        lacks count as absent there): the same Tally on every process. A collective when world > 1."""
        if world == 1:
            return self
        parts: list = [None] * world
        dist.all_gather_object(parts, (dict(self.sums), dict(self.weights), dict(self.counts), self.maxima))
        total = Tally()
        for sums, weights, counts, maxima in parts:
            total.merge(Tally(defaultdict(float, sums), defaultdict(float, weights), counts, maxima))
        return total


def rank0s(obj, world: int):
    """Rank 0's `obj` on every process (one broadcast when world > 1; `obj` itself otherwise)."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def rank0_stage(what: str, world: int):
    """Run a block that only rank 0 does real work in (writing a file), then share its outcome: when it
    raised on rank 0, every process raises (rank 0 its own error; the others RunDirError for an
    OSError, else RuntimeError, "rank 0 could not {what}: ..."). A collective when world > 1."""
    error = None
    try:
        yield
    except Exception as e:  # KeyboardInterrupt (a second signal) stops this process at once
        error = e
    if world == 1:
        if error is not None:
            raise error
        return
    share_rank0_outcome(error, what)


class CollectiveTimeoutError(RuntimeError):
    """A collective outlived the process group's timeout (--dist-timeout); the message names this
    process, the step and the phase it was in, and what to do."""


@dataclass
class Whereabouts:
    """Where this process is in the run (its rank, the step, the phase), for the message of a
    collective that times out there."""

    rank: int = 0
    world: int = 1
    step: int | None = None  # 1-based; None: before the first step (setup, resume)
    phase: str = "setup (processes, data, model, resume)"

    def at(self, phase: str, step: int | None = None) -> None:
        self.phase = phase
        if step is not None:
            self.step = step

    def __str__(self) -> str:
        when = self.phase if self.step is None else f"{self.phase} of step {self.step}"
        return f"on rank {self.rank} of {self.world}, in {when}"


def collective_timeout_line(e: BaseException, seconds: float, where: Whereabouts | None = None) -> str | None:
    """What to tell the user when `e` is a collective that outlived the process group's timeout
    (gloo: "Timed out waiting 2000ms for recv operation ..."; NCCL with TORCH_NCCL_BLOCKING_WAIT=1: a
    DistBackendError naming the timeout and the operation), else None. `where`: this process's rank,
    step and phase, named in the line."""
    text = str(e)
    gloo = isinstance(e, RuntimeError) and re.search(r"Timed out waiting \d+ ?ms", text) is not None
    nccl = type(e).__name__ == "DistBackendError" and re.search(r"(?i)time(d)? ?out", text) is not None
    if not (gloo or nccl):
        return None
    what = re.search(r"Timed out waiting \d+ ?ms for \w+( operation)?|OpType=\w+|Timeout\(ms\)=\d+", text)
    return (
        f"a collective between the processes waited longer than --dist-timeout ({seconds:g} s)"
        + (f" {where}" if where is not None else "")
        + (f" ({what.group(0)})" if what else "")
        + ": another process stalled or died (its own output says why); if it was only slow (hashing a "
        "large checkpoint at resume, a slow disk), raise --dist-timeout and resume with --resume auto"
    )
