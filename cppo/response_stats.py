"""Per-token log-probs and entropies of a response under one view, from one pass.

Both the detector and the trainer score a sampled response by teacher forcing it. This module runs
the model's backbone once, keeps only the hidden states that predict response tokens, and sends
those through the output head in chunks of positions (`cppo.loss.entropy.chunked_entropy_and_logprob`),
so the (N, T, V) logits of a long response never exist at once and prompt positions never reach
the head (docs/method.md §5.8). Entropy and log-prob come from the same chunk's logits.

Three departures from the official code, each with equal results (tests/test_bench_fast_paths.py,
tests/test_shared_prompts.py) and measured in docs/benchmarks.md: the G rows of a group encode
their shared image once per pass (`shared_image_features`); the head's backward is written by
hand (`fused_head_stats`) instead of re-running each checkpointed chunk through autograd; and a
pass without gradient (the reference's and old policy's log-probs, CPPO's selection pass under I-,
the detector) runs each distinct prompt once and only the responses per row (`shared_prompt_hidden`).

The paths these replaced stay as plain parameters of `plain_response_stats`, for the tests and for
bench/bench_step.py, which passes them to the trainer's update as its scoring function (e.g.
`functools.partial(response_stats, full_logits=True)`); the trainer itself never sets them:
- `full_logits=True` is the official code's way: the model's own forward puts EVERY position (prompt
  and response) through the output head, and the response's (N, T, V) logits are upcast to float32
  and turned into log-probs and entropies all at once, so the float32 (N, T, V) tensors live until
  the backward;
- `share_images=False` runs the vision tower once per row;
- `fused=False` uses cppo.loss.entropy's checkpointed chunks instead of the hand-written backward;
- `share_prompts=False` runs every row's prompt in a pass without gradient too.

Letters: N rows, L prompt columns (left-padded), T response columns, D hidden size, V vocabulary.
"""

from __future__ import annotations

import inspect

import torch

from cppo.batching import mrope_positions
from cppo.loss.entropy import chunked_entropy_and_logprob
from cppo.precision import autocast_dtype


def backbone_and_head(model):
    """(multimodal backbone, output head) of a Qwen2.5-VL model, through DDP and peft wrappers."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if hasattr(inner, "get_base_model"):  # peft
        inner = inner.get_base_model()
    return inner.model, inner.lm_head


def shared_image_features(
    backbone,
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    keys: list | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """(image tokens of the batch, D) features of every image of the batch, in order, with each run of
    identical consecutive images encoded once.

    The G rows of a prompt's group carry the same pixels (rows of a group are adjacent), and the
    model's own forward runs the vision tower once per row. Here each image equal to the previous
    distinct one (same grid, `torch.equal` patches) reuses its features: the tower runs once per
    prompt and view instead of G times. Under grad, autograd sums the G rows' feature gradients
    before one backward through the tower, so the loss is the same and the gradients equal up to
    float summation order (tests/test_bench_fast_paths.py). The official code encodes every row.

    `keys` (one hashable per image) and `cache` (a dict): an image whose key is in `cache` reuses
    those features, and the others are stored there, computed without gradient. Only for a frozen
    tower, whose features do not change and need no gradient: the trainer encodes each image of a
    step once per tower this way instead of once per pass (cppo.rl.update).
    """
    sizes = image_grid_thw.prod(-1).tolist()  # patches per image
    parts = torch.split(pixel_values, sizes)
    which, uniq = [], []  # which[i]: index into uniq of image i
    for i, (part, grid) in enumerate(zip(parts, image_grid_thw)):
        j = uniq[-1] if uniq else None
        if keys is not None:
            same = j is not None and keys[j] == keys[i]
        else:
            same = j is not None and torch.equal(image_grid_thw[j], grid) and torch.equal(parts[j], part)
        if not same:
            uniq.append(i)
        which.append(len(uniq) - 1)
    if cache is not None and keys is not None:
        missing = [i for i in uniq if keys[i] not in cache]
        if missing:
            with torch.no_grad():
                new = backbone.get_image_features(
                    torch.cat([parts[i] for i in missing]), image_grid_thw[missing], return_dict=True
                ).pooler_output
            cache.update({keys[i]: f for i, f in zip(missing, new)})
        feats = [cache[keys[i]] for i in uniq]
    else:
        feats = backbone.get_image_features(
            torch.cat([parts[i] for i in uniq]), image_grid_thw[uniq], return_dict=True
        ).pooler_output  # one (tokens, D) per distinct image
    return torch.cat([feats[w] for w in which])  # (image tokens, D)


def embeddings_with_images(backbone, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
    """(N, S, D) input embeddings of `input_ids` (N, S) with `image_features` (image tokens, D) in
    place of the image placeholder tokens, in order: what Qwen2.5-VL's forward builds from
    `pixel_values`, here from features computed once per distinct image.

    Handed to the backbone as `inputs_embeds` together with `input_ids` (which it still reads for the
    3-D M-RoPE positions), the two arguments every transformers release this project accepts takes
    alike. transformers 5.25 also takes precomputed features as `mm_encoder_outputs`, but 5.17 has
    no such argument: it lands in `**kwargs` and is dropped, and the pass scores with no image."""
    embeds = backbone.get_input_embeddings()(input_ids)  # (N, S, D)
    slots = input_ids == backbone.config.image_token_id  # (N, S)
    if int(slots.sum()) != image_features.shape[0]:
        raise ValueError(
            f"{int(slots.sum())} image tokens in the batch but {image_features.shape[0]} image features"
        )
    feats = image_features.to(embeds.device, embeds.dtype)
    return embeds.masked_scatter(slots.unsqueeze(-1), feats)


def blank_image_features(backbone) -> torch.Tensor:
    """The vision tower's output for one blank image of the smallest grid (1 merged token).

    Under FSDP every process must run the tower's sharded blocks in every pass (cppo.rl.update): a
    pass whose rows have no image runs it here and adds the features times 0."""
    cfg = backbone.visual.config
    m = cfg.spatial_merge_size
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    param = next(backbone.visual.parameters())
    pixels = torch.zeros(m * m, patch_dim, dtype=param.dtype, device=param.device)  # (m*m, C*t*p*p)
    grid = torch.tensor([[1, m, m]], device=param.device)  # (1, 3) t, h, w in patches
    return backbone.get_image_features(pixels, grid, return_dict=True).pooler_output[0]  # (1, D)


def response_hidden(
    model,
    inputs: dict,
    pixel_values: torch.Tensor | None = None,
    share_images: bool = True,
    run_vision: bool = False,
) -> torch.Tensor:
    """(N, T, D) hidden states that predict the T response tokens of `append_responses` inputs.

    `pixel_values` replaces the batch's images with a view of the same size (same grids, same ids).
    `share_images`: encode repeated images once (`shared_image_features`).
    `run_vision`: run the vision tower even when the rows have no image (`blank_image_features`).
    """
    backbone, _ = backbone_and_head(model)
    L = inputs["prompt_length"]
    fwd = {k: v for k, v in inputs.items() if k not in ("prompt_length", *CACHE_KEYS)}
    keys, cache = _cache_of(inputs, pixel_values)
    if pixel_values is not None:
        fwd["pixel_values"] = pixel_values
    has_images = fwd.get("pixel_values") is not None
    if share_images and has_images and fwd.get("image_grid_thw") is not None:
        feats = shared_image_features(backbone, fwd.pop("pixel_values"), fwd["image_grid_thw"], keys, cache)
        fwd["inputs_embeds"] = embeddings_with_images(backbone, fwd["input_ids"], feats)
    T = fwd["input_ids"].shape[1] - L
    blank = None  # the tower runs where a pass with images runs it: before the language model
    if run_vision and not has_images:
        blank = blank_image_features(backbone)  # (1, D)
    hidden = backbone(**fwd, use_cache=False).last_hidden_state  # (N, L+T, D)
    if blank is not None:
        hidden = hidden + 0.0 * blank.sum()
    return hidden[:, L - 1 : L - 1 + T]  # (N, T, D): column L-1+t predicts response token t


def shared_prompt_hidden(model, inputs: dict, pixel_values: torch.Tensor | None = None,
                         run_vision: bool = False) -> torch.Tensor:  # fmt: skip
    """(N, T, D) hidden states that predict the T response tokens, as `response_hidden`, with each
    distinct prompt run once: for a pass without gradient.

    Rows given adjacent whose prompt columns are equal (ids, attention and embeddings, so their
    images too) share one prefill of those L columns; its KV cache is then repeated for each row and
    the T response columns of all N rows run on it. The G rows of a rollout group have one prompt,
    which is most of a row's tokens (the demo: 107 prompt tokens, 17 response tokens), so the pass
    computes about L + G·T columns per group instead of G·(L + T). The positions are the full
    sequence's (M-RoPE: `cppo.batching.mrope_positions` over prompt + response), the
    ones the single forward uses; the values equal `response_hidden`'s up to float summation order
    (tests/test_shared_prompts.py). Under FSDP the backbone runs twice here on every process alike.
    """
    from transformers import DynamicCache

    backbone, _ = backbone_and_head(model)
    L = inputs["prompt_length"]
    ids, attn = inputs["input_ids"], inputs["attention_mask"]  # (N, L+T)
    T = ids.shape[1] - L
    pixels = inputs.get("pixel_values") if pixel_values is None else pixel_values
    grid = inputs.get("image_grid_thw")
    if pixels is not None and grid is not None:
        feats = shared_image_features(backbone, pixels, grid, *_cache_of(inputs, pixel_values))
        embeds = embeddings_with_images(backbone, ids, feats)
    else:
        embeds = backbone.get_input_embeddings()(ids)  # (N, L+T, D)
    blank = blank_image_features(backbone) if run_vision and pixels is None else None
    positions = mrope_positions(backbone, {**inputs, "image_grid_thw": grid if pixels is not None else None})
    first, owner = _prompt_runs(ids[:, :L], attn[:, :L], embeds[:, :L])  # (P,), (N,)
    key = "cache" if "cache" in inspect.signature(type(backbone).forward).parameters else "past_key_values"
    cache = DynamicCache()
    prefill = backbone(
        inputs_embeds=embeds[first, :L],
        attention_mask=attn[first, :L],
        position_ids=positions[:, first, :L],  # (4, P, L)
        **{key: cache},
        use_cache=True,
    ).last_hidden_state  # (P, L, D)
    cache.batch_select_indices(owner)  # (N rows): each row reads its prompt's keys and values
    responses = backbone(
        inputs_embeds=embeds[:, L:],
        attention_mask=attn,  # (N, L+T): the prompt's padding stays masked
        position_ids=positions[:, :, L:],  # (4, N, T)
        **{key: cache},
        use_cache=True,
    ).last_hidden_state  # (N, T, D)
    hidden = torch.cat([prefill[owner, -1:], responses[:, : T - 1]], 1)  # (N, T, D): as response_hidden
    return hidden if blank is None else hidden + 0.0 * blank.sum()


CACHE_KEYS = ("image_keys", "image_cache")  # inputs' entries for `shared_image_features`'s cache


def _cache_of(inputs: dict, pixel_values) -> tuple[list | None, dict | None]:
    """(keys, cache) of the inputs' images, when the caller gave them and no view replaces them."""
    if pixel_values is not None:
        return None, None
    return inputs.get("image_keys"), inputs.get("image_cache")


def _prompt_runs(ids: torch.Tensor, attn: torch.Tensor, embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(first (P,), owner (N,)): the first row of each run of adjacent rows with equal prompt columns
    (ids (N, L), attention (N, L), embeddings (N, L, D)), and each row's run."""
    first, owner = [], []
    for r in range(ids.shape[0]):
        j = first[-1] if first else None
        same = j is not None and all(torch.equal(x[j], x[r]) for x in (ids, attn, embeds))
        if not same:
            first.append(r)
        owner.append(len(first) - 1)
    device = ids.device
    return torch.tensor(first, device=device), torch.tensor(owner, device=device)


def response_stats(model, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy (N, T), logprob (N, T)) of the response tokens under one view: `plain_response_stats`,
    run through the FSDP root's gathered parameters when the model is sharded (cppo.rl.fsdp)."""
    fsdp_entry = getattr(model, "cppo_response_stats", None)
    if fsdp_entry is not None:  # every pass runs the sharded vision blocks (cppo.rl.update)
        return fsdp_entry(*args, run_vision=True, **kwargs)
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
    share_images: bool = True,
    fused: bool = True,
    run_vision: bool = False,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy (N, T), logprob (N, T)) of the response tokens under one view, float32.

    Both are 0 outside `response_mask`. The log-prob carries the gradient; the entropy is detached
    (it only ranks tokens) unless `entropy_grad` (PAPO's entropy regulariser needs it). Logits are
    divided by `temperature` (docs/method.md §5.6). `full_logits`: the official code's unchunked path
    (see the module docstring); same values, much more memory; it encodes every row's images, as
    the official code does. `share_images`: encode a group's repeated images once. `fused`: the head
    through `fused_head_stats` where it applies (a plain linear head, detached entropy), else the
    checkpointed chunks of cppo.loss.entropy. `run_vision`: see `response_hidden`. `share_prompts`:
    without gradient (torch.no_grad), each distinct prompt runs once (`shared_prompt_hidden`).
    """
    if full_logits:
        return _full_logits_stats(
            model, inputs, response_ids, response_mask, temperature, pixel_values, entropy_grad
        )
    _, head = backbone_and_head(model)
    T = inputs["input_ids"].shape[1] - inputs["prompt_length"]
    if share_prompts and share_images and not torch.is_grad_enabled() and T > 0:
        hidden = shared_prompt_hidden(model, inputs, pixel_values, run_vision)  # (N, T, D)
    else:
        hidden = response_hidden(model, inputs, pixel_values, share_images, run_vision)  # (N, T, D)
    mask = response_mask.to(hidden.device).bool()
    targets = response_ids.to(hidden.device)
    plain_linear = isinstance(head, torch.nn.Linear) and head.bias is None
    if fused and plain_linear and not entropy_grad and bool(mask.any()):
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
    fwd = {k: v for k, v in inputs.items() if k not in ("prompt_length", *CACHE_KEYS)}
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
    The checkpointed autograd path (cppo.loss.entropy) instead re-runs the whole chunk function in
    backward, entropy included, and then back-propagates through log_softmax and gather: about a
    third more work over (P, V) per pass, for the same numbers. The entropy is detached (it only
    ranks tokens), so the gradient is that of the log-prob alone.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, temperature, chunk_size):
        # The head's matmul runs in the precision autocast gives it (bf16 under bf16 compute), in
        # forward AND backward: the backward runs outside the caller's autocast region on CUDA, so
        # the dtype is fixed here and both passes cast explicitly (float32 master weight in, float32
        # weight gradient out).
        cd = autocast_dtype(h.device.type) or torch.promote_types(h.dtype, weight.dtype)
        P = h.shape[0]
        ent = torch.empty(P, dtype=torch.float32, device=h.device)
        lp = torch.empty_like(ent)
        lse = torch.empty_like(ent)
        w = weight.to(cd)  # (V, D), a no-op when it already is
        for s in range(0, P, chunk_size):
            z = _head_logits(h[s : s + chunk_size], w, cd) / temperature  # (c, V) float32
            lse_c = torch.logsumexp(z, dim=-1)  # (c,)
            logp = z - lse_c.unsqueeze(-1)  # (c, V)
            lp[s : s + chunk_size] = logp.gather(-1, targets[s : s + chunk_size].unsqueeze(-1)).squeeze(-1)
            safe = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
            ent[s : s + chunk_size] = -(logp.exp() * safe).sum(-1)
            lse[s : s + chunk_size] = lse_c
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.temperature, ctx.chunk_size, ctx.compute_dtype = temperature, chunk_size, cd
        ctx.mark_non_differentiable(ent)
        return ent, lp

    @staticmethod
    def backward(ctx, _grad_ent, grad_lp):
        h, weight, targets, lse = ctx.saved_tensors
        T, c, cd = ctx.temperature, ctx.chunk_size, ctx.compute_dtype
        grad_h = torch.zeros_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        w = weight.to(cd)  # (V, D)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], c):
                hc, g = h[s : s + c].to(cd), grad_lp[s : s + c].float()  # (c, D), (c,)
                z = _head_logits(hc, w, cd) / T  # (c, V) float32
                gz = torch.exp(z - lse[s : s + c].unsqueeze(-1)).mul_(-g.unsqueeze(-1))  # -g * softmax
                gz.scatter_add_(1, targets[s : s + c].unsqueeze(-1), g.unsqueeze(-1))  # + g * onehot
                gz = gz.div_(T).to(cd)  # d loss / d (h W^T)
                if grad_h is not None:
                    grad_h[s : s + c] = (gz @ w).to(h.dtype)
                if ctx.needs_input_grad[1]:
                    grad_w += (gz.t() @ hc).float()
        grad_w = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None


def _head_logits(h: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
    """(c, V) float32 logits of h (c, D) through a (V, D) head, the matmul in `compute_dtype`."""
    with torch.autocast(h.device.type, enabled=False):
        return torch.nn.functional.linear(h.to(compute_dtype), weight.to(compute_dtype)).float()


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
