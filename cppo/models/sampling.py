"""Sampling inside `model.generate` in which each block of rows draws from its own generator.

transformers' sampler draws every row of a `generate` call from torch's one global generator, so
what a row samples depends on which other rows share the call. `BlockSampler` is a logits
processor that does the sampling itself: block k of the call (rows k·r .. k·r + r - 1) draws with
`torch.multinomial` from its own `torch.Generator`, seeded from `seeds[k]`, after the same
temperature, top-k and top-p warpers transformers applies, and hands back scores that are -inf on
every token but the drawn one, so that `generate` (run greedy) takes the drawn token.

A block therefore samples what it samples alone, whichever blocks share its call (up to the
floating-point differences of a larger, differently padded batch, which decide a draw only when
the uniform number falls within rounding of a boundary of the cumulative distribution). A block of
r rows seeded with s draws exactly what `torch.manual_seed(s)` followed by transformers' own
sampler draws for those r rows alone: the same warpers in the same order, then one `multinomial`
over the block per token from a generator in the same state.

Letters: R rows of the call, r rows per block, V vocabulary.
"""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def sampling_warpers(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> list[LogitsProcessor]:
    """transformers' own temperature, top-k (0 = off) and top-p (1 = off) warpers, in the order its
    sampler applies them; each maps (R, V) scores to (R, V) scores."""
    warpers: list[LogitsProcessor] = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p))
    return warpers


class BlockSampler(LogitsProcessor):
    """Draws each block of `rows_per_seed` adjacent rows from its own generator (module docstring).

    Pass it as `logits_processor` of a greedy `generate` call (do_sample=False) with no sampling
    settings of its own: the temperature, top-k (0 = off) and top-p (1 = off) are applied here,
    after any processor transformers runs before custom ones (a repetition penalty, suppressed
    tokens), as its sampler applies them."""

    def __init__(
        self,
        seeds: list[int],
        rows_per_seed: int,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ):
        self.rows_per_seed = rows_per_seed
        self.seeds = [int(s) for s in seeds]
        self.generators: list[torch.Generator] = []  # made on the scores' device at the first token
        self.warpers = sampling_warpers(temperature, top_k, top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """(R, V) scores -> (R, V): 0 on each row's drawn token, -inf elsewhere."""
        r = self.rows_per_seed
        if scores.shape[0] != r * len(self.seeds):
            raise ValueError(
                f"{scores.shape[0]} rows in the call, but {len(self.seeds)} seeds x {r} rows per seed"
            )
        if not self.generators:  # where the logits are (not the parameters' device under CPU offload)
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores, dim=-1)  # (R, V), as transformers' sampler computes them
        blocks = [probs[k * r : (k + 1) * r] for k in range(len(self.generators))]
        drawn = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(blocks, self.generators)])
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)
