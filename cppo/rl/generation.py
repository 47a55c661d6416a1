"""Rollout generation in batches of rows: how many rows one `generate` call takes, and what seeds them.

A step's rows are generated `generation_rows` at a time (whole groups), so that the KV cache of
one call, which grows with rows x (prompt + response) tokens, stays bounded whatever the step's
size. Each call's prompts are cut to their own longest prompt (`cppo.batching.trim_prompt`).

What the samples depend on:
- `--seed-per-prompt`: each prompt's group samples from its own generator, seeded from its own
  seed (`cppo.models.sampling.BlockSampler`), so the samples do not depend on the generation batch
  size, on the other prompts of a call or on how prompts are shared among processes (up to the
  floating-point differences of differently padded batches, which on CPU float32 never changed a
  sample in the tests; under bf16 on a GPU a near-tie may);
- otherwise one stream, torch's global generator seeded once from the step's generator seed, runs
  through the calls in order: with one call (every row fitting the batch) the samples are those of
  the one-call trainer, and another generation batch size draws other samples from the same policy.

Letters: B prompts, G group, N = B·G rows, L prompt columns, T response columns.
"""

from __future__ import annotations

import torch

from cppo.batching import take_rows, trim_prompt
from cppo.models import generate_responses
from cppo.precision import resolve_dtype
from cppo.rl.fsdp import compute_device
from cppo.rl.memory import ModelShape

CPU_GENERATION_ROWS = 64  # rows per call on the CPU, where memory is not the limit
MAX_GENERATION_ROWS = 256  # at most this many rows per call on CUDA
KV_SHARE = 0.5  # of the free device memory, for the KV cache of one call


def generation_rows(model, cfg, prompt_length: int) -> int:
    """Rows per `generate` call: `cfg.generation_batch_size`, else sized from memory on CUDA
    (`memory_sized_rows` of one row's KV cache for prompt + max_new_tokens tokens) and 64 on the
    CPU; rounded down to whole groups, at least one."""
    G = cfg.group_size
    rows = cfg.generation_batch_size
    device = compute_device(model)  # not the parameters' device under FSDP's CPU offload
    if rows is None and device.type == "cuda":
        compute = resolve_dtype(cfg.dtype, device)
        shape = ModelShape.from_config(getattr(model, "module", model).config)
        row_bytes = shape.kv_bytes_per_token(compute.itemsize) * (prompt_length + cfg.max_new_tokens)
        rows = memory_sized_rows(torch.cuda.mem_get_info(device)[0], row_bytes)
    elif rows is None:
        rows = CPU_GENERATION_ROWS
    return max(G, rows // G * G)


def memory_sized_rows(free_bytes: int, row_bytes: int) -> int:
    """Rows whose KV cache (`row_bytes` each) fits in half of `free_bytes`, at most 256."""
    return min(MAX_GENERATION_ROWS, int(KV_SHARE * free_bytes) // max(1, row_bytes))


def sampler_settings(cfg) -> dict:
    """Exactly the configured sampler, nothing from the checkpoint's generation_config."""
    return dict(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        repetition_penalty=cfg.repetition_penalty,
        do_sample=cfg.temperature > 0,
    )


def generate_groups(
    model,
    processor,
    batch_b: dict,
    cfg,
    generator_seed: int,
    group_seeds: list[int] | None,
    image_token_id: int,
    rows_per_call: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, T), mask (N, T)) of G responses to each of the B prompts of `batch_b`, rows of a group
    adjacent, in calls of `rows_per_call` rows (whole groups). `group_seeds` (B): each group samples
    from its own seed; None: one stream from `generator_seed` (module docstring)."""
    G = cfg.group_size
    B = batch_b["input_ids"].shape[0]
    per_call = max(1, rows_per_call // G)  # prompts per call
    kw = sampler_settings(cfg)
    parts = []
    for p0 in range(0, B, per_call):
        prompts = list(range(p0, min(B, p0 + per_call)))
        call = trim_prompt(take_rows(batch_b, [b for b in prompts for _ in range(G)], image_token_id))
        if group_seeds is not None:
            seeds = dict(seeds=[group_seeds[b] for b in prompts])
        else:  # the stream is seeded before the first call and runs on through the others
            seeds = dict(generator_seed=generator_seed if p0 == 0 else None)
        parts.append(generate_responses(model, processor, call, **seeds, **kw))
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    T = max(ids.shape[1] for ids, _ in parts)
    ids = torch.full((B * G, T), pad, dtype=torch.long)
    mask = torch.zeros(B * G, T, dtype=torch.bool)
    row = 0
    for i, m in parts:
        ids[row : row + i.shape[0], : i.shape[1]] = i
        mask[row : row + m.shape[0], : m.shape[1]] = m
        row += i.shape[0]
    return ids, mask
