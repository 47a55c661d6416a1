"""Rollout generation in batches of rows: how many rows one call takes, which engine runs it, and
what seeds it.

A step's rows are generated `generation_rows` at a time (whole groups), so that the KV cache of
one call, which grows with rows x (prompt + response) tokens, stays bounded whatever the step's
size. Each call's prompts are cut to their own longest prompt (`cppo.batching.trim_prompt`).

The engine (`--rollout-engine`): `cppo` (the default) is `cppo.models.rollout_engine.sample_groups`,
which prefills each of the call's prompts once and drops finished rows; `cppo-graphs` the same with
the decode step captured as a CUDA graph (CUDA only); `hf` is transformers' `generate` on each
prompt repeated G times (`cppo.models.generate_responses`), kept for comparison. Greedy, they give
the same responses; sampled, the same distribution (draws differ once a row has ended: the
engine's module docstring).

What the samples depend on:
- `--seed-per-prompt`: each prompt's group samples from its own generator, seeded from its own
  seed (`cppo.models.sampling.BlockSampler`), so the samples do not depend on the generation batch
  size, on the other prompts of a call or on how prompts are shared among processes (up to the
  floating-point differences of differently padded batches, which on CPU float32 never changed a
  sample in the tests; under bf16 on a GPU a near-tie may);
- otherwise one stream, torch's global generator seeded once from the step's generator seed, runs
  through the calls in order: with one call (every row fitting the batch) the samples are those of
  the one-call trainer, and another generation batch size draws other samples from the same policy.
  The stream is also drawn through differently by the engines (the engine's module docstring).

Under FSDP the calls run inside `cppo.rl.fsdp.gathered` (every unit gathered once) and issue no
collective of their own (the engine runs plain forwards; `generate_responses` turns transformers'
`synced_gpus` off), so ranks may make different numbers of calls; the rows per call are agreed all
the same (`generation_rows`).

Letters: B prompts, G group, N = B·G rows, L prompt columns, T response columns.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cppo.batching import take_rows, trim_prompt
from cppo.models import generate_responses, sample_groups
from cppo.precision import resolve_dtype
from cppo.rl.fsdp import compute_device
from cppo.rl.memory import ModelShape
from cppo.rl.ranks import collective_device

CPU_GENERATION_ROWS = 64  # rows per call on the CPU, where memory is not the limit
MAX_GENERATION_ROWS = 256  # at most this many rows per call on CUDA
KV_SHARE = 0.5  # of the free device memory, for the KV cache of one call


def generation_rows(model, cfg, prompt_length: int) -> int:
    """Rows per generation call (either engine): `cfg.generation_batch_size`, else sized from memory on CUDA
    (`memory_sized_rows` of one row's KV cache for prompt + max_new_tokens tokens, after freeing the
    allocator's cache) and 64 on the CPU; rounded down to whole groups, at least one.

    Unconfigured and distributed, the rows are the minimum over the processes (`agreed_rows`, a
    collective: every process calls this at the same point of the step), so that every rank makes
    calls of the same size whatever its own free memory and prompt length."""
    G = cfg.group_size
    rows = cfg.generation_batch_size
    if rows is None:
        device = compute_device(model)  # not the parameters' device under FSDP's CPU offload
        free = free_device_memory(device)
        if free is None:
            rows = CPU_GENERATION_ROWS
        else:
            compute = resolve_dtype(cfg.dtype, device)
            shape = ModelShape.from_config(getattr(model, "module", model).config)
            row_bytes = shape.kv_bytes_per_token(compute.itemsize) * (prompt_length + cfg.max_new_tokens)
            rows = memory_sized_rows(free, row_bytes)
        rows = agreed_rows(rows)
    return max(G, rows // G * G)


def memory_sized_rows(free_bytes: int, row_bytes: int) -> int:
    """Rows whose KV cache (`row_bytes` each) fits in half of `free_bytes`, at most 256."""
    return min(MAX_GENERATION_ROWS, int(KV_SHARE * free_bytes) // max(1, row_bytes))


def free_device_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA `device` once the caching allocator has returned its unused blocks (None
    off CUDA). Without `empty_cache` the update's cached peak reads as used: the same rank then got
    195 rows at step 1 and 90-115 later."""
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def agreed_rows(rows: int) -> int:
    """The smallest of every process's `rows` (one all-reduce MIN; `rows` itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    least = torch.tensor([rows], device=collective_device())
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    return int(least)


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
    adjacent, in calls of `rows_per_call` rows (whole groups) by `cfg.rollout_engine`. `group_seeds`
    (B): each group samples from its own seed; None: one stream from `generator_seed` (module
    docstring)."""
    G = cfg.group_size
    B = batch_b["input_ids"].shape[0]
    per_call = max(1, rows_per_call // G)  # prompts per call
    kw = sampler_settings(cfg)
    parts = []
    for p0 in range(0, B, per_call):
        prompts = list(range(p0, min(B, p0 + per_call)))
        if group_seeds is not None:
            seeds = dict(seeds=[group_seeds[b] for b in prompts])
        else:  # the stream is seeded before the first call and runs on through the others
            seeds = dict(generator_seed=generator_seed if p0 == 0 else None)
        if cfg.rollout_engine == "hf":
            call = trim_prompt(take_rows(batch_b, [b for b in prompts for _ in range(G)], image_token_id))
            parts.append(generate_responses(model, processor, call, **seeds, **kw))
        else:  # each prompt once: the engine makes its G rows
            call = trim_prompt(take_rows(batch_b, prompts, image_token_id))
            decode = "cuda-graphs" if cfg.rollout_engine == "cppo-graphs" else "dynamic"
            parts.append(sample_groups(model, processor, call, G, **seeds, **kw, decode=decode))
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
