"""The prompt sampler: B draws per step from a per-epoch permutation, resumable, with a view seed each.

    sampler = PromptSampler(len(dataset), cfg.prompts_per_step, seed=cfg.seed, drop_last=cfg.drop_last)
    draws = sampler.next_batch()                 # B Draw(index, epoch, view_seed)
    upcoming = sampler.peek()                    # the next batch's draws, without moving on
    state = sampler.state_dict()                 # into the checkpoint; load_state_dict on resume

The permutation of an epoch is fixed by (seed, epoch); a step that crosses an epoch boundary finishes
the old epoch and starts the next, so every sample is seen once per epoch. With ``drop_last`` (the
official verl dataloader's ``drop_last=True``, vbdi/cppo verl/verl/trainer/ppo/ray_trainer.py) an
epoch is floor(num_samples / B) whole steps instead: the num_samples mod B samples at the end of its
permutation are not drawn that epoch, and no step spans two epochs. Each draw carries a view
seed derived from (seed, epoch, index) alone (docs/method.md §1: one I+ and one I- per prompt, shared
by its group), so a resumed run or another process draws the same views for the same sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def view_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's I+/I- views in one epoch: a function of (seed, epoch, index) only."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


@dataclass(frozen=True)
class Draw:
    index: int
    epoch: int
    view_seed: int


class PromptSampler:
    """B draws per step from per-epoch permutations; ``state_dict`` saves the position for resuming.

    Every process builds the same sampler and gets the same global batch; sharding it across ranks
    is the loop's business.
    """

    def __init__(self, num_samples: int, prompts_per_step: int, seed: int = 0, drop_last: bool = False):
        if num_samples < 1 or prompts_per_step < 1:
            raise ValueError(
                f"need num_samples >= 1 and prompts_per_step >= 1, got {num_samples}, {prompts_per_step}"
            )
        if drop_last and num_samples < prompts_per_step:
            raise ValueError(f"drop_last: {num_samples} samples make no full step of {prompts_per_step}")
        self.num_samples, self.prompts_per_step, self.seed = num_samples, prompts_per_step, seed
        self.drop_last = drop_last
        self.epoch, self.offset = 0, 0

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def next_batch(self) -> list[Draw]:
        draws: list[Draw] = []
        if self.drop_last and self.offset + self.prompts_per_step > self.num_samples:
            self.epoch, self.offset = self.epoch + 1, 0  # the epoch's remainder is not drawn
        while len(draws) < self.prompts_per_step:
            order = self.permutation(self.epoch)
            take = order[self.offset : self.offset + self.prompts_per_step - len(draws)]
            draws += [Draw(int(i), self.epoch, view_seed(self.seed, self.epoch, int(i))) for i in take]
            self.offset += len(take)
            if self.offset == self.num_samples:
                self.epoch, self.offset = self.epoch + 1, 0
        return draws

    def peek(self) -> list[Draw]:
        """The draws the next `next_batch` will return, leaving the position where it is (the loop
        prepares the next step's prompts ahead, cppo.rl.prefetch)."""
        epoch, offset = self.epoch, self.offset
        try:
            return self.next_batch()
        finally:
            self.epoch, self.offset = epoch, offset

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "prompts_per_step": self.prompts_per_step,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "prompts_per_step"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume the data order: the checkpoint has {key}={state[key]}, "
                    f"this run {getattr(self, key)} (the data or config changed)"
                )
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
