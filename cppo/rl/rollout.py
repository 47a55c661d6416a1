"""Rollouts: views, G samples per prompt, rewards and group advantages for one step.

docs/method.md §1 and §4. Each prompt gets ONE preserving view I+ and ONE removing view I- from the
preset, drawn from the sample's own seed (so a resumed or re-sharded run draws the same views), and
shared by its G rollouts and by every update of the step. A multi-image prompt has each of its
images perturbed (seed + image index); a text-only prompt has no views and no CPL (§5.9).

Letters: B prompts on this process, G group, N = B·G rows, T response tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cppo.batching import take_rows
from cppo.loss import group_advantages
from cppo.models import append_responses, encode_images, encode_prompts, generate_responses
from cppo.models.inputs import END_TOKENS
from cppo.precision import autocast, resolve_dtype
from cppo.rl.data import Sample
from cppo.rl.fsdp import gathered
from cppo.rl.perception import get_perception_term
from cppo.rl.rewards import RewardResult, RewardScorer


@dataclass
class Rollouts:
    """Everything the update needs about one step's N responses (rows of a group are adjacent)."""

    inputs: dict  # teacher-forcing inputs of the N rows (append_responses), incl. "prompt_length"
    response_ids: torch.Tensor  # (N, T) long
    response_mask: torch.Tensor  # (N, T) bool
    has_image: torch.Tensor  # (N,) bool: rows whose prompt has at least one image
    truncated: torch.Tensor  # (N,) bool: rows cut at max_new_tokens before any end token
    views: dict[str, torch.Tensor]  # "positive"/"negative" -> pixel_values of the N rows, like inputs'
    rewards: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,)
    texts: list[str]  # N decoded responses
    samples: list[Sample]  # B
    view_records: list[list[dict]]  # B: one record per image of the prompt
    reward_result: RewardResult
    old_logp: torch.Tensor | None = None  # (N, T), from the rollout policy (None: on-policy, use logp)
    ref_logp: torch.Tensor | None = None  # (N, T), from the frozen reference
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.response_ids.shape[0]


def draw_views(samples: list[Sample], view_seeds: list[int], preset) -> tuple[list, list, list]:
    """(positive images, negative images, records), each a list of B lists (one entry per image)."""
    pos, neg, records = [], [], []
    for sample, seed in zip(samples, view_seeds):
        p, n, r = [], [], []
        for j, image in enumerate(sample.images):
            a, b, rec = preset.draw(image, seed + j)
            p.append(a)
            n.append(b)
            r.append(rec)
        pos.append(p)
        neg.append(n)
        records.append(r)
    return pos, neg, records


def _row_pixels(batch_b: dict, pixel_values: torch.Tensor, rows: list[int], image_token_id: int):
    """The N-row pixel_values of a view, given the view's B-prompt pixel_values (same grids)."""
    return take_rows({**batch_b, "pixel_values": pixel_values}, rows, image_token_id)["pixel_values"]


def _generate(model, processor, batch_n: dict, cfg, generator_seed: int, per_prompt_seeds, image_token_id):
    """(ids (N, T), mask (N, T)): one generate call for the batch, or one per prompt's group when
    `per_prompt_seeds` is given, so that a group's samples do not depend on the rest of the batch
    (nor on how prompts are shared among processes)."""
    kw = dict(  # exactly the configured sampler, nothing from the checkpoint's generation_config
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        repetition_penalty=cfg.repetition_penalty,
        do_sample=cfg.temperature > 0,
    )
    if per_prompt_seeds is None:
        return generate_responses(model, processor, batch_n, generator_seed=generator_seed, **kw)
    G = cfg.group_size
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    parts = []
    for b, seed in enumerate(per_prompt_seeds):
        group = take_rows(batch_n, list(range(b * G, (b + 1) * G)), image_token_id)
        parts.append(generate_responses(model, processor, group, generator_seed=seed, **kw))
    T = max(ids.shape[1] for ids, _ in parts)
    ids = torch.full((len(parts) * G, T), pad, dtype=torch.long)
    mask = torch.zeros(len(parts) * G, T, dtype=torch.bool)
    for b, (i, m) in enumerate(parts):
        ids[b * G : (b + 1) * G, : i.shape[1]] = i
        mask[b * G : (b + 1) * G, : m.shape[1]] = m
    return ids, mask


def collect_rollouts(
    model,
    processor,
    samples: list[Sample],
    view_seeds: list[int],
    cfg,
    preset,
    scorer: RewardScorer,
    generator_seed: int,
    timer=None,
    per_prompt_seeds: list[int] | None = None,
) -> Rollouts:
    """Generate G responses per prompt with the current policy and score them.

    `cfg` supplies group_size, the sampler's settings, adv_std_scale and algo (whose perception term
    says which views to draw: cppo.rl.perception);
    `timer` (cppo.rl.update.Timer) receives the reward phase's seconds.
    """
    G = cfg.group_size
    image_token_id = model.config.image_token_id
    images = [s.images for s in samples]
    batch_b = encode_prompts(processor, [s.question for s in samples], images)  # B rows
    rows = [b for b in range(len(samples)) for _ in range(G)]  # (N,) prompt of each row
    batch_n = take_rows(batch_b, rows, image_token_id)  # N rows, left-padded

    views: dict[str, torch.Tensor] = {}
    records: list[list[dict]] = [[] for _ in samples]
    needed = get_perception_term(cfg.algo).views  # CPPO both, PAPO the removing one, GRPO none
    if needed and any(images):
        pos, neg, records = draw_views(samples, view_seeds, preset)
        drawn = {"positive": pos, "negative": neg}
        for view in needed:
            views[view] = _row_pixels(batch_b, encode_images(processor, drawn[view])[0], rows, image_token_id)

    device = next(model.parameters()).device
    # FSDP: one all-gather for the whole generation; bf16 compute under --dtype bfloat16
    with gathered(model), autocast(device, resolve_dtype(cfg.dtype, device)):
        ids, mask = _generate(
            model, processor, batch_n, cfg, generator_seed, per_prompt_seeds, image_token_id
        )
    texts = processor.tokenizer.batch_decode(
        [row[m].tolist() for row, m in zip(ids, mask)], skip_special_tokens=True
    )
    sample_dicts = [samples[b].to_dict() for b in rows]
    t0 = time.perf_counter()
    scored = scorer(texts, [s["answer"] for s in sample_dicts], sample_dicts)
    if timer is not None:
        timer["reward"] += time.perf_counter() - t0
    rewards = torch.tensor(scored.total, dtype=torch.float32)  # (N,)
    advantages = group_advantages(rewards, G, scale_by_std=cfg.adv_std_scale)  # (N,)
    has_image = torch.tensor([len(samples[b].images) > 0 for b in rows])  # (N,)
    end_ids = processor.tokenizer.convert_tokens_to_ids(list(END_TOKENS))
    return Rollouts(
        inputs=append_responses(batch_n, ids, mask),
        response_ids=ids,
        response_mask=mask,
        has_image=has_image,
        truncated=truncated_rows(ids, mask, end_ids),
        views=views,
        rewards=rewards,
        advantages=advantages,
        texts=texts,
        samples=samples,
        view_records=records,
        reward_result=scored,
    )


def truncated_rows(ids: torch.Tensor, mask: torch.Tensor, end_ids: list[int]) -> torch.Tensor:
    """(N,) bool: responses (N, T) with no end token among their own tokens, i.e. cut at
    max_new_tokens (generation stops early only once every row has ended)."""
    return ~(torch.isin(ids, torch.tensor(end_ids)) & mask).any(1)


def select_rows(ro: Rollouts, rows: list[int], image_token_id: int, view: str | None = None) -> dict:
    """Teacher-forcing inputs of `rows`, with the images of `view` ("positive"/"negative") if given."""
    inputs = ro.inputs
    if view is not None:
        inputs = {**inputs, "pixel_values": ro.views[view]}
    return take_rows(inputs, rows, image_token_id)  # prompt_length passes through
