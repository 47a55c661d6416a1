"""Per-token log-probs and entropies of a response under one view, from one pass.

Both the detector and the trainer score a sampled response by teacher forcing it. This module runs
the model's backbone once, keeps only the hidden states that predict response tokens, and sends
those through the output head in chunks of positions (`cppo.detect.select.chunked_entropy_and_logprob`),
so the (N, T, V) logits of a long response never exist at once and prompt positions never reach
the head (docs/method.md §5.8). Entropy and log-prob come from the same chunk's logits.

Two departures from the official code, both with equal loss and gradients
(tests/test_bench_fast_paths.py) and measured in docs/benchmarks.md: the G rows of a group encode
their shared image once per pass (`shared_image_features`), and the head's backward is written by
hand (`fused_head_stats`) instead of re-running each checkpointed chunk through autograd.

`full_logits=True` is the official code's way, kept as a reference for tests and benchmarks
(bench/bench_step.py): the model's own forward puts EVERY position (prompt and response) through the
output head, and the response's (N, T, V) logits are upcast to float32 and turned into log-probs
and entropies all at once, so the float32 (N, T, V) tensors live until the backward.

Letters: N rows, L prompt columns (left-padded), T response columns, D hidden size, V vocabulary.
"""

from __future__ import annotations

import torch

from cppo.loss.entropy import chunked_entropy_and_logprob

# Default of `share_images` when a caller passes None (the trainer does); bench/bench_step.py turns it
# off to measure the per-row encoding it replaced.
SHARE_IMAGES = True
# Whether `response_stats` uses `fused_head_stats` (else cppo.detect.select's checkpointed chunks);
# bench/bench_step.py turns it off to measure the path it replaced.
FUSED_HEAD = True


def backbone_and_head(model):
    """(multimodal backbone, output head) of a Qwen2.5-VL model, through DDP and peft wrappers."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    return inner.model, inner.lm_head


def shared_image_features(backbone, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
    """`mm_encoder_outputs` for `backbone.forward` with each run of identical consecutive images
    encoded once.

    The G rows of a prompt's group carry the same pixels (rows of a group are adjacent), and the
    model's own forward runs the vision tower once per row. Here each image equal to the previous
    distinct one (same grid, `torch.equal` patches) reuses its features: the tower runs once per
    prompt and view instead of G times. Under grad, autograd sums the G rows' feature gradients
    before one backward through the tower, so the loss is the same and the gradients equal up to
    float summation order (tests/test_bench_fast_paths.py). The official code encodes every row.
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    sizes = image_grid_thw.prod(-1).tolist()  # patches per image
    parts = torch.split(pixel_values, sizes)
    which, uniq = [], []  # which[i]: index into uniq of image i
    for i, (part, grid) in enumerate(zip(parts, image_grid_thw)):
        j = uniq[-1] if uniq else None
        same = j is not None and torch.equal(image_grid_thw[j], grid) and torch.equal(parts[j], part)
        if not same:
            uniq.append(i)
        which.append(len(uniq) - 1)
    feats = backbone.get_image_features(
        torch.cat([parts[i] for i in uniq]), image_grid_thw[uniq], return_dict=True
    ).pooler_output  # one (tokens, D) per distinct image
    return {"image": BaseModelOutputWithPooling(pooler_output=tuple(feats[w] for w in which))}


def response_hidden(
    model, inputs: dict, pixel_values: torch.Tensor | None = None, share_images: bool = True
) -> torch.Tensor:
    """(N, T, D) hidden states that predict the T response tokens of `append_responses` inputs.

    `pixel_values` replaces the batch's images with a view of the same size (same grids, same ids).
    `share_images`: encode repeated images once (`shared_image_features`).
    """
    backbone, _ = backbone_and_head(model)
    L = inputs["prompt_length"]
    fwd = {k: v for k, v in inputs.items() if k != "prompt_length"}
    if pixel_values is not None:
        fwd["pixel_values"] = pixel_values
    if share_images and fwd.get("pixel_values") is not None and fwd.get("image_grid_thw") is not None:
        pixels = fwd.pop("pixel_values")
        fwd["mm_encoder_outputs"] = shared_image_features(backbone, pixels, fwd["image_grid_thw"])
    T = fwd["input_ids"].shape[1] - L
    hidden = backbone(**fwd, use_cache=False).last_hidden_state  # (N, L+T, D)
    return hidden[:, L - 1 : L - 1 + T]  # (N, T, D): column L-1+t predicts response token t


def response_stats(model, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy (N, T), logprob (N, T)) of the response tokens under one view: `plain_response_stats`,
    run through the FSDP root's gathered parameters when the model is sharded (cppo.rl.fsdp)."""
    fsdp_entry = getattr(model, "cppo_response_stats", None)
    if fsdp_entry is not None:
        return fsdp_entry(*args, **kwargs)
    return plain_response_stats(model, *args, **kwargs)


def plain_response_stats(
    model,
    inputs: dict,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 256,
    pixel_values: torch.Tensor | None = None,
    entropy_grad: bool = False,
    full_logits: bool = False,
    share_images: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy (N, T), logprob (N, T)) of the response tokens under one view, float32.

    Both are 0 outside `response_mask`. The log-prob carries the gradient; the entropy is detached
    (it only ranks tokens) unless `entropy_grad` (PAPO's entropy regulariser needs it). Logits are
    divided by `temperature` (docs/method.md §5.6). `full_logits`: the official code's unchunked path
    (see the module docstring); same values, much more memory; it encodes every row's images, as
    the official code does. `share_images`: encode a group's repeated images once (None: the module's
    SHARE_IMAGES, True).
    """
    if full_logits:
        return _full_logits_stats(
            model, inputs, response_ids, response_mask, temperature, pixel_values, entropy_grad
        )
    _, head = backbone_and_head(model)
    share = SHARE_IMAGES if share_images is None else share_images
    hidden = response_hidden(model, inputs, pixel_values, share)  # (N, T, D)
    mask = response_mask.to(hidden.device).bool()
    targets = response_ids.to(hidden.device)
    plain_linear = isinstance(head, torch.nn.Linear) and head.bias is None
    if FUSED_HEAD and plain_linear and not entropy_grad and bool(mask.any()):
        return fused_head_stats(hidden, head.weight, targets, mask, temperature, chunk_size)
    return chunked_entropy_and_logprob(
        hidden,
        head,
        targets,
        temperature=temperature,
        chunk_size=chunk_size,
        mask=mask,
        entropy_grad=entropy_grad,
    )


def _full_logits_stats(model, inputs, response_ids, response_mask, temperature, pixel_values, entropy_grad):
    """The official code's path: head over all L+T positions, then all (N, T, V) float32 at once."""
    L = inputs["prompt_length"]
    fwd = {k: v for k, v in inputs.items() if k != "prompt_length"}
    if pixel_values is not None:
        fwd["pixel_values"] = pixel_values
    T = fwd["input_ids"].shape[1] - L
    logits = model(**fwd, use_cache=False).logits  # (N, L+T, V): every position through the head
    z = logits[:, L - 1 : L - 1 + T].float() / temperature  # (N, T, V) float32
    logp_all = torch.log_softmax(z, dim=-1)  # (N, T, V)
    targets = response_ids.to(z.device).long()
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N, T)
    src = logp_all if entropy_grad else logp_all.detach()
    entropy = -(src.exp() * src).sum(-1)  # (N, T)
    mask = response_mask.to(z.device).bool()
    return entropy.masked_fill(~mask, 0.0), logp.masked_fill(~mask, 0.0)


class _HeadStats(torch.autograd.Function):
    """Entropy and target log-prob of softmax(h W^T / temperature), chunked over positions, with a
    hand-written backward.

    Forward keeps only h and one log-sum-exp per position. Backward recomputes each chunk's logits
    once and forms d logp / d z = onehot(target) - softmax(z) directly from the saved log-sum-exp.
    The checkpointed autograd path (cppo.detect.select) instead re-runs the whole chunk function in
    backward, entropy included, and then back-propagates through log_softmax and gather: about a
    third more work over (P, V) per pass, for the same numbers. The entropy is detached (it only
    ranks tokens), so the gradient is that of the log-prob alone.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk_size):
        P = h.shape[0]
        ent = torch.empty(P, dtype=torch.float32, device=h.device)
        lp = torch.empty_like(ent)
        lse = torch.empty_like(ent)
        for s in range(0, P, chunk_size):
            z = torch.nn.functional.linear(h[s : s + chunk_size], weight).float() / temperature  # (c, V)
            lse_c = torch.logsumexp(z, dim=-1)  # (c,)
            logp = z - lse_c.unsqueeze(-1)  # (c, V)
            lp[s : s + chunk_size] = logp.gather(-1, targets[s : s + chunk_size].unsqueeze(-1)).squeeze(-1)
            safe = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
            ent[s : s + chunk_size] = -(logp.exp() * safe).sum(-1)
            lse[s : s + chunk_size] = lse_c
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.mark_non_differentiable(ent)
        return ent, lp

    @staticmethod
    def backward(ctx, _grad_ent, grad_lp):
        h, weight, targets, lse = ctx.saved_tensors
        T, c = ctx.temperature, ctx.chunk_size
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, h.shape[0], c):
            hc, g = h[s : s + c], grad_lp[s : s + c].float()  # (c, D), (c,)
            z = torch.nn.functional.linear(hc, weight).float() / T  # (c, V)
            gz = torch.exp(z - lse[s : s + c].unsqueeze(-1)).mul_(-g.unsqueeze(-1))  # -g * softmax
            gz.scatter_add_(1, targets[s : s + c].unsqueeze(-1), g.unsqueeze(-1))  # + g * onehot
            gz = gz.div_(T).to(h.dtype)  # d loss / d (h W^T)
            if grad_h is not None:
                grad_h[s : s + c] = gz @ weight
            if ctx.needs_input_grad[1]:
                grad_w += (gz.t() @ hc).float()
        grad_w = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None


def fused_head_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target_ids: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy (N, T), logprob (N, T)) as `chunked_entropy_and_logprob` with a plain (V, D) head and a
    detached entropy, through `_HeadStats`; 0 outside `mask`."""
    n, t, d = hidden.shape
    idx = mask.reshape(-1).nonzero().squeeze(1)  # (P,)
    h = hidden.reshape(n * t, d).index_select(0, idx)  # (P, D): only response positions
    tgt = target_ids.reshape(-1).index_select(0, idx).long()
    ent, lp = _HeadStats.apply(h, weight, tgt, temperature, chunk_size)
    zeros = torch.zeros(n * t, dtype=ent.dtype, device=ent.device)
    return zeros.index_copy(0, idx, ent).reshape(n, t), zeros.index_copy(0, idx, lp).reshape(n, t)
