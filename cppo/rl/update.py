"""The policy update of one step: PPO-clip + beta·KL(ref) + lambda·CPL (docs/method.md §3), or PAPO.

For each mini-batch of rows, for each micro-batch:
  1. anchor pass on I: log-probs (with grad) and entropies (detached) from one pass;
  2. GRPO loss on the anchor;
  3. CPPO: the gate (A > 0 by default) picks the rows that may carry CPL; only those rows get the
     I- pass (log-probs for the loss, entropies for the selection), and only rows with at least one
     selected token get the I+ pass. A row outside that set contributes exactly 0 to L_CPL, so its
     passes are skipped without changing the loss (docs/method.md §5.7). `skip_views=False` runs every
     pass on every row, as the official code does, for tests and benchmarks; `full_logits=True`
     also scores every pass as the official code does (all positions through the head, all
     (n, T, V) logits in float32 at once: cppo.scoring), for benchmarks;
  4. backward of the micro-batch's loss scaled by its share of the mini-batch's rows.

Departures from the official code, each on purpose:
- Every loss is aggregated within its micro-batch and scaled by micro rows / mini-batch rows (the
  verl convention); across processes the gradients are SUMMED, so N rows on one process or N/2 on
  each of two give the same update when micro-batch boundaries agree.
- The selection uses the anchor pass's entropies H(I) and the I- pass's H(I-) under the CURRENT
  parameters, as the paper says; nothing is recomputed.

Precision: every forward runs inside `cppo.precision.autocast` (bf16 compute under `--dtype
bfloat16`, the default on CUDA) while the trainable parameters, their gradients and AdamW's state
stay float32; the backward runs outside the autocast region.

FSDP: how ranks stay in step. A sharded module all-gathers its parameters in every forward (and
again in the backward), so every rank must call the same modules the same number of times in every
micro-batch, whatever its rows. The anchor pass runs on every rank's micro-batch anyway. The view
passes are data-dependent (the gate, the selection, which rows have images), so before each one the
ranks agree on it with one small all-reduce (the largest row count over processes): when no rank
needs the pass, nobody runs it; when another rank needs it and this one has no row for it, this one
scores one stand-in row of its micro-batch and adds its result times 0 to the loss, so the forward
and the backward issue the same collectives and the update does not change. A pass without images
on a rank whose peers have images runs the vision tower on a blank image (cppo.scoring,
`run_vision`), for the same reason. Without FSDP no pass waits for another process.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.distributed as dist

from cppo.loss import (
    contrastive_perception_loss,
    entropy_bonus,
    gate_responses,
    grpo_loss,
    implicit_perception_loss,
    select_perception_tokens,
)
from cppo.precision import autocast, resolve_dtype
from cppo.rl.fsdp import is_sharded
from cppo.rl.rollout import Rollouts, select_rows
from cppo.scoring import response_stats


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


def _stats(
    model,
    ro: Rollouts,
    rows: list[int],
    cfg,
    view: str | None = None,
    entropy_grad: bool = False,
    full_logits: bool = False,
):
    """(entropy (n, T), logprob (n, T)) of `rows` under `view` (None = the original images)."""
    inputs = select_rows(ro, rows, _image_token_id(model), view)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    ids = ro.response_ids[rows].to(device)
    mask = ro.response_mask[rows].to(device)
    with autocast(device, resolve_dtype(cfg.dtype, device)):
        return response_stats(
            model,
            inputs,
            ids,
            mask,
            cfg.temperature,
            cfg.logits_chunk_size,
            entropy_grad=entropy_grad,
            full_logits=full_logits,
        )


def _collective_device(model) -> torch.device:
    """Where a small all-reduce tensor must live: the GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _rows_in_step(model, n: int) -> int:
    """How many rows this process scores in a pass for which it has `n` rows of its own.

    Unsharded: `n` (0 = skip the pass). Sharded (module docstring): 0 when no process has a row for
    the pass, `n` when this one has, and -1 when only others have: score one stand-in row, weight 0."""
    if not is_sharded(model):
        return n
    most = torch.tensor([n], device=_collective_device(model))
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    if int(most) == 0:
        return 0
    return n if n > 0 else -1


def _image_token_id(model) -> int:
    inner = getattr(model, "module", model)
    return inner.config.image_token_id


@torch.no_grad()
def rollout_logprobs(model, ro: Rollouts, cfg, full_logits: bool = False) -> torch.Tensor:
    """(N, T) log-probs of the responses under `model` (no grad), in micro-batches."""
    out = torch.zeros(ro.response_ids.shape, dtype=torch.float32)
    for s in range(0, ro.num_rows, cfg.micro_batch_size):
        rows = list(range(s, min(s + cfg.micro_batch_size, ro.num_rows)))
        _, logp = _stats(model, ro, rows, cfg, full_logits=full_logits)
        out[rows] = logp.float().cpu()
    return out


def micro_batch_loss(
    model,
    ro: Rollouts,
    rows: list[int],
    cfg,
    timer: Timer,
    skip_views: bool = True,
    full_logits: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one micro-batch (not yet scaled) and its metrics."""
    device = next(model.parameters()).device
    mask = ro.response_mask[rows].to(device)  # (n, T)
    adv = ro.advantages[rows].to(device)  # (n,)
    papo_entropy = cfg.algo == "papo" and cfg.papo_entropy_coef > 0
    entropy, logp = _stats(model, ro, rows, cfg, entropy_grad=papo_entropy, full_logits=full_logits)  # anchor
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
    if cfg.algo == "cppo" and cfg.cpl_lambda > 0:
        cpl, cpl_metrics = _cpl(model, ro, rows, cfg, entropy, logp, timer, skip_views, full_logits)
        loss = loss + cfg.cpl_lambda * cpl
        metrics.update(cpl_metrics)
    elif cfg.algo == "papo":
        papo, papo_metrics = _papo(model, ro, rows, cfg, logp, entropy, timer)
        loss = loss + papo
        metrics.update(papo_metrics)
    return loss, metrics


def _cpl(model, ro, rows, cfg, entropy, logp, timer, skip_views, full_logits=False):
    """lambda-free CPL of a micro-batch; rows without an image or a passing gate skip the views."""
    device = logp.device
    mask = ro.response_mask[rows].to(device)
    adv, rewards = ro.advantages[rows].to(device), ro.rewards[rows].to(device)
    gate = gate_responses(adv, rewards, cfg.cpl_gate, max_reward=sum(cfg.reward_weights))
    gate &= ro.has_image[rows].to(device)
    needs_views = bool(ro.views) and bool(gate.any())
    local = gate.nonzero().squeeze(1).tolist() if skip_views else list(range(len(rows)))
    in_step = _rows_in_step(model, len(local) if needs_views else 0)
    if in_step == 0:  # no process runs I- (nor I+)
        return _no_cpl(logp)
    if in_step == -1:  # only other processes do: stand in for I-, then join their I+ agreement
        neg = _stand_in_passes(model, ro, rows, cfg, -1, ("negative",))
        pos = _stand_in_passes(model, ro, rows, cfg, _rows_in_step(model, 0), ("positive",))
        return _no_cpl(logp, *neg, *pos)
    view_rows = [rows[i] for i in local]
    with timer("perception"):
        ent_neg, logp_neg = _stats(
            model, ro, view_rows, cfg, view="negative", full_logits=full_logits
        )  # (v, T)
    # docs/method.md §2: the top fraction of positively shifted tokens per response, then the gate (which
    # already holds "has an image"), computed once above.
    sel = select_perception_tokens(
        entropy[local], ent_neg, mask[local], top_percent=cfg.top_percent, score=cfg.selector
    )  # (v, T) bool
    sel &= gate[local].unsqueeze(1)
    keep = sel.any(dim=1).nonzero().squeeze(1).tolist() if skip_views else list(range(len(local)))
    in_step = _rows_in_step(model, len(keep))
    if in_step <= 0:
        return _no_cpl(logp, logp_neg, *_stand_in_passes(model, ro, rows, cfg, in_step, ("positive",)))
    with timer("perception"):
        _, logp_pos = _stats(
            model, ro, [view_rows[i] for i in keep], cfg, view="positive", full_logits=full_logits
        )
    anchor = logp[[local[i] for i in keep]]
    cpl, metrics = contrastive_perception_loss(
        anchor,
        logp_pos,
        logp_neg[keep],
        sel[keep],
        tau=cfg.cpl_tau,
        divergence=cfg.cpl_divergence,
        agg="token-mean",
        response_mask=mask[[local[i] for i in keep]],
    )
    metrics["cpl/mask_frac"] = float(sel.sum()) / max(int(mask.sum()), 1)  # of the micro-batch's tokens
    metrics["cpl/rows"] = float(len(keep))
    return cpl, metrics


def _stand_in_passes(model, ro, rows, cfg, in_step: int, views: tuple[str, ...], **kw) -> list[torch.Tensor]:
    """Log-probs of one stand-in row under each of `views` when `in_step` is -1 (only other processes
    run these passes: module docstring), for the caller to add times 0; nothing otherwise."""
    if in_step != -1:
        return []
    with_view = [v if v in ro.views else None for v in views]  # a text-only batch has no views
    return [_stats(model, ro, rows[:1], cfg, view=v, **kw)[1] for v in with_view]


def _no_cpl(*graph: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """An exact 0 that stays in the autograd graph of `graph`, and the metrics of an empty CPL."""
    zero = sum(t.sum() * 0.0 for t in graph)
    return zero, {"cpl/loss": 0.0, "cpl/mask_frac": 0.0, "cpl/rows": 0.0}


def _papo(model, ro, rows, cfg, logp, entropy, timer):
    """PAPO (arXiv 2507.06448) on the image rows: gamma·(-KL(pi_I || pi_Imask)) on every response
    token, plus the double-entropy regulariser eta·(H(I) + H(Imask)) that keeps the maximised KL from
    being won by making either view's distribution flat."""
    device = logp.device
    image_rows = [i for i, r in enumerate(rows) if bool(ro.has_image[r])]
    use_entropy = cfg.papo_entropy_coef > 0
    in_step = _rows_in_step(model, len(image_rows) if ro.views else 0)
    if in_step <= 0:
        stand_in = _stand_in_passes(model, ro, rows, cfg, in_step, ("negative",), entropy_grad=use_entropy)
        return sum((t.sum() * 0.0 for t in stand_in), logp.sum() * 0.0), {}
    with timer("perception"):
        ent_m, logp_m = _stats(
            model, ro, [rows[i] for i in image_rows], cfg, view="negative", entropy_grad=use_entropy
        )
    mask = ro.response_mask[rows].to(device)[image_rows]
    kl_loss, metrics = implicit_perception_loss(
        logp[image_rows], logp_m, mask, divergence=cfg.cpl_divergence, clip=cfg.papo_clip, agg=cfg.loss_agg
    )
    loss = cfg.papo_gamma * kl_loss
    if use_entropy:
        bonus_i, _ = entropy_bonus(entropy[image_rows], mask, cfg.loss_agg)  # -H(I)
        bonus_m, m = entropy_bonus(ent_m, mask, cfg.loss_agg)  # -H(Imask)
        loss = loss - cfg.papo_entropy_coef * (bonus_i + bonus_m)
        metrics["papo/entropy_masked"] = m["entropy/mean"]
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
    skip_views: bool = True,
    full_logits: bool = False,
) -> dict[str, float]:
    """All optimizer updates of one step over this process's rows; returns mean metrics."""
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = is_sharded(model)
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
            for s in range(0, len(mini_rows), cfg.micro_batch_size):
                rows = mini_rows[s : s + cfg.micro_batch_size]
                with timer("update"):
                    loss, metrics = micro_batch_loss(model, ro, rows, cfg, timer, skip_views, full_logits)
                    # share of the GLOBAL mini-batch: processes' gradients are summed below
                    (loss * (len(rows) / (len(mini_rows) * world_size))).backward()
                for k, v in metrics.items():
                    sums[k] += v
                    counts[k] += 1
            with timer("update"):
                if world_size > 1 and not sharded:  # FSDP reduce-scatters (a sum) in the backward
                    _all_reduce_grads(params)
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
                if torch.isfinite(norm):
                    optimizer.step()
                    scheduler.step()
                else:
                    skipped += 1
                sums["grad_norm"] += float(norm)
                counts["grad_norm"] += 1
    model.eval()
    out = {k: sums[k] / counts[k] for k in sums}
    out["update/skipped_nonfinite"] = float(skipped)
    out["lr"] = scheduler.get_last_lr()[0]
    return out
