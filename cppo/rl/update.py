"""The policy update of one step: PPO-clip + beta·KL(ref) + the algorithm's perception term
(docs/method.md §3).

For each mini-batch of rows: first the perception term's passes without gradient for the whole
mini-batch (`PerceptionTerm.prepare`: CPPO's selection pass under I- when its term is sampled, in
forwards of several micro-batches' rows; the parameters do not change within a mini-batch, so each
micro-batch reads the values its own pass would give), then for each micro-batch:
  1. anchor pass on I: log-probs (with grad) and entropies (detached) from one pass;
  2. GRPO loss on the anchor;
  3. the perception term named by `--algo` (cppo.rl.perception: none for GRPO, lambda·CPL for CPPO
     with its I- and I+ passes on the rows that can carry it, PAPO's masked-view terms), handed the
     micro-batch and its anchor pass as a `MicroBatch`;
  4. backward of the micro-batch's loss scaled by its share of the mini-batch's rows.

How each pass runs (its rows' inputs, trimming, the views, the stand-ins that keep FSDP ranks in
step) is cppo.rl.passes. `--sort-by-length` sorts a mini-batch's rows by length into micro-batches
of the same number and sizes.

Departures from the official code, each on purpose:
- Every loss is aggregated within its micro-batch and scaled by micro rows / mini-batch rows (the
  verl convention); across processes the gradients are SUMMED, so N rows on one process or N/2 on
  each of two give the same update when micro-batch boundaries agree.
- The selection uses the anchor pass's entropies H(I) and the I- pass's H(I-) under the CURRENT
  parameters, as the paper says; nothing is recomputed.

Precision: every forward runs inside `cppo.precision.autocast` (bf16 compute under `--dtype
bfloat16`, the default on CUDA) while the trainable parameters, their gradients and AdamW's state
stay float32; the backward runs outside the autocast region.

FSDP: every rank calls the same sharded modules the same number of times in every micro-batch,
whatever its rows (cppo.rl.passes says how the data-dependent view passes keep to that).
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.distributed as dist

from cppo.loss import grpo_loss
from cppo.rl.clip import clip_grad_norm
from cppo.rl.fsdp import compute_device, is_sharded
from cppo.rl.passes import MicroBatch, Passes, _entropy_and_logp
from cppo.rl.perception import get_perception_term
from cppo.rl.ranks import Tally
from cppo.rl.rollout import Rollouts, micro_batches


class Timer(defaultdict):
    """Seconds per phase, summed: `with timer("rollout"): ...`."""

    def __init__(self):
        super().__init__(float)

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer[name] += time.perf_counter() - self.t0

        return _Span()


@torch.no_grad()
def rollout_logprobs(model, ro: Rollouts, cfg, passes: Passes = Passes()):
    """(N, T) log-probs of the responses under `model` (no grad), in micro-batches of adjacent rows:
    a group's rows share their prompt, which the pass then runs once (cppo.response_stats,
    `shared_prompt_hidden`), and each micro-batch is trimmed to its rows' tokens. A row's log-probs
    do not depend on the rows sharing its pass."""
    out = torch.zeros(ro.response_ids.shape, dtype=torch.float32)
    for rows in micro_batches(ro, list(range(ro.num_rows)), cfg.micro_batch_size, by_length=False):
        _, logp = _entropy_and_logp(model, ro, rows, cfg, passes=passes)
        out[rows] = logp.float().cpu()
    return out


def micro_batch_loss(
    model,
    ro: Rollouts,
    rows: list[int],
    cfg,
    timer: Timer,
    passes: Passes = Passes(),
    stored: dict | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch (not yet scaled) and its metrics. `stored`: passes run before the
    mini-batch (`MicroBatch.stored`)."""
    term = get_perception_term(cfg.algo) if passes.term is None else passes.term
    device = compute_device(model)
    mask = ro.response_mask[rows].to(device)  # (n, T)
    adv = ro.advantages[rows].to(device)  # (n,)
    entropy, logp = _entropy_and_logp(model, ro, rows, cfg, None, term.entropy_grad(cfg), passes)  # anchor
    old = logp.detach() if ro.old_logp is None else ro.old_logp[rows].to(device)
    ref = None if ro.ref_logp is None else ro.ref_logp[rows].to(device)
    loss, metrics = grpo_loss(
        old,
        logp,
        adv,
        mask,
        ref_logp=ref,
        beta=cfg.beta,
        kl=cfg.kl_estimator,
        policy_loss=cfg.policy_loss,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        dual_clip=cfg.dual_clip,
        agg=cfg.loss_agg,
    )
    n_tok = mask.sum().clamp(min=1)
    metrics["entropy/mean"] = float((entropy.detach() * mask).sum() / n_tok)
    extra, term_metrics = term(MicroBatch(model, ro, rows, cfg, timer, entropy, logp, passes, stored or {}))
    if extra is not None:
        loss = loss + extra
    metrics.update(term_metrics)
    return loss, metrics


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum gradients over processes, in one flat buffer (see the module docstring for why a sum)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def policy_update(
    model,
    optimizer,
    scheduler,
    ro: Rollouts,
    cfg,
    timer: Timer,
    world_size: int = 1,
    passes: Passes = Passes(),
) -> dict[str, float]:
    """All optimizer updates of one step over this process's rows; returns the metrics' means over
    every process's micro-batches (a collective when world_size > 1: cppo.rl.ranks).
    `cfg.sort_by_length` sorts each mini-batch's rows by length into its micro-batches (trimmed
    passes only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = is_sharded(model)
    term = get_perception_term(cfg.algo) if passes.term is None else passes.term
    n = ro.num_rows
    mini = (cfg.mini_batch_size or n * world_size) // world_size  # rows per update on this process
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    skipped = 0
    model.train()
    for _ in range(cfg.ppo_epochs):
        for m0 in range(0, n, mini):
            mini_rows = list(range(m0, min(m0 + mini, n)))
            optimizer.zero_grad(set_to_none=True)
            with timer("update"):  # the term's passes without gradient, for the whole mini-batch
                stored = term.prepare(MicroBatch(model, ro, mini_rows, cfg, timer, None, None, passes))
            by_length = passes.trim and cfg.sort_by_length
            for rows in micro_batches(ro, mini_rows, cfg.micro_batch_size, by_length):
                with timer("update"):
                    loss, metrics = micro_batch_loss(model, ro, rows, cfg, timer, passes, stored)
                    # share of the GLOBAL mini-batch: processes' gradients are summed below
                    (loss * (len(rows) / (len(mini_rows) * world_size))).backward()
                for k, v in metrics.items():
                    sums[k] += v
                    counts[k] += 1
            with timer("update"):
                if world_size > 1 and not sharded:  # FSDP reduce-scatters (a sum) in the backward
                    _all_reduce_grads(params)
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                norm = clip_grad_norm(params, max_norm)  # FSDP: local shards, one scalar all-reduce
                if torch.isfinite(norm):
                    optimizer.step()
                    scheduler.step()
                else:
                    skipped += 1
                sums["grad_norm"] += float(norm)
                counts["grad_norm"] += 1
    model.eval()
    # means over every process's micro-batches (cppo.rl.ranks): one process's value on the same rows
    tally = Tally()
    for k in sums:
        tally.mean(k, sums[k], counts[k])
    tally.max("update/skipped_nonfinite", skipped)  # the same on every rank: the norm is global
    out = tally.over_ranks(world_size).values()
    out["lr"] = scheduler.get_last_lr()[0]
    return out
