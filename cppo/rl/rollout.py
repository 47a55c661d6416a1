"""Rollouts: views, G samples per prompt, rewards and group advantages for one step.

docs/method.md §1 and §4. Each prompt gets ONE preserving view I+ and ONE removing view I- from the
preset, drawn from the sample's own seed (so a resumed or re-sharded run draws the same views), and
shared by its G rollouts and by every update of the step. A multi-image prompt has each of its
images perturbed (seed + image index); a text-only prompt has no views and no CPL (§5.9).

Two halves: `prepare_prompts` is the host's work (encode the prompts and their images, draw and
encode the views), made without the model, so that the loop can run it for the next step in a
background thread (cppo.rl.prefetch); `collect_rollouts` generates (cppo.rl.generation), scores
and computes the advantages. Images, original and views, are held once per prompt (B-prompt
`pixel_values`), not once per row: `select_rows` expands a pass's rows when it runs.

Letters: B prompts on this process, G group, N = B·G rows, T response tokens, P patches, D = 1176.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cppo.batching import ROW_KEYS, images_per_row, join_images, split_images, take_rows
from cppo.loss import group_advantages
from cppo.models import append_responses, encode_images, encode_prompts
from cppo.models.inputs import END_TOKENS
from cppo.precision import autocast, resolve_dtype
from cppo.prompt import INSTRUCTION
from cppo.rl.data import Sample
from cppo.rl.fsdp import compute_device, gathered
from cppo.rl.generation import generate_groups, generation_rows
from cppo.rl.perception import get_perception_term
from cppo.rl.rewards import RewardResult, RewardScorer

CPL_ROWS_STREAM = 0x43504C  # the seed's second word for the --cpl-rows draws ('CPL')


@dataclass
class Prompts:
    """A step's B prompts as the host prepares them (`prepare_prompts`), before the model runs."""

    samples: list[Sample]  # B
    batch: dict  # the B prompts, left-padded (encode_prompts), with their images when any
    images_per_prompt: list[int]  # (B,) images of each prompt, in `batch`'s image order
    views: dict[str, torch.Tensor]  # "positive"/"negative" -> (P, D) pixel_values of the B prompts
    view_records: list[list[dict]]  # B: one record per image of the prompt
    view_seeds: list[int] = field(default_factory=list)  # (B,) each prompt's seed (views, CPL row draws)


@dataclass
class Rollouts:
    """Everything the update needs about one step's N responses (rows of a group are adjacent)."""

    inputs: dict  # N rows' prompt + response ids, attention and mm_token_type_ids; "prompt_length"; no images
    response_ids: torch.Tensor  # (N, T) long
    response_mask: torch.Tensor  # (N, T) bool
    has_image: torch.Tensor  # (N,) bool: rows whose prompt has at least one image
    truncated: torch.Tensor  # (N,) bool: rows cut at max_new_tokens before any end token
    pixel_values: torch.Tensor | None  # (P, D) the B prompts' own images, once per prompt; None: no image
    image_grid_thw: torch.Tensor | None  # (I, 3), of the images in prompt order
    images_per_prompt: list[int]  # (B,)
    views: dict[str, torch.Tensor]  # "positive"/"negative" -> (P, D) of the B prompts, like pixel_values
    rewards: torch.Tensor  # (N,)
    advantages: torch.Tensor  # (N,)
    texts: list[str]  # N decoded responses
    samples: list[Sample]  # B
    view_records: list[list[dict]]  # B: one record per image of the prompt
    reward_result: RewardResult
    row_draws: torch.Tensor | None = None  # (N,) U[0, 1) per row from its prompt's seed: --cpl-rows draws
    old_logp: torch.Tensor | None = None  # (N, T), from the rollout policy (None: on-policy, use logp)
    ref_logp: torch.Tensor | None = None  # (N, T), from the frozen reference
    timings: dict[str, float] = field(default_factory=dict)
    # (id of a frozen vision tower, view, prompt, image) -> its features: each image of the step is
    # encoded once per frozen tower (cppo.response_stats.shared_image_features, cppo.rl.update)
    image_features: dict = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.response_ids.shape[0]

    @property
    def group_size(self) -> int:
        return self.num_rows // max(1, len(self.samples))


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


def prepare_prompts(
    processor,
    samples: list[Sample],
    view_seeds: list[int],
    algo: str,
    preset,
    instruction: str | None = INSTRUCTION,
) -> Prompts:
    """The host's part of a step's rollouts: the B prompts encoded with their images, and the views
    the perception term of `algo` names (CPPO both, PAPO the removing one, GRPO none) drawn from
    each prompt's view seed and encoded. Uses no global random state and no model."""
    images = [s.images for s in samples]
    batch = encode_prompts(processor, [s.question for s in samples], images, instruction)  # B rows
    counts = [0] * len(samples)
    if batch.get("pixel_values") is not None:
        counts = images_per_row(batch["input_ids"], batch["image_grid_thw"], image_token_id(processor))
    views: dict[str, torch.Tensor] = {}
    records: list[list[dict]] = [[] for _ in samples]
    needed = get_perception_term(algo).views
    if needed and any(images):
        pos, neg, records = draw_views(samples, view_seeds, preset)
        drawn = {"positive": pos, "negative": neg}
        for view in needed:
            pixels, grids = encode_images(processor, drawn[view])
            if not torch.equal(grids, batch["image_grid_thw"]):
                raise ValueError(f"the {view} view changed an image's size: views must keep the grid")
            views[view] = pixels
    return Prompts(samples, batch, counts, views, records, list(view_seeds))


def image_token_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")


def collect_rollouts(
    model,
    processor,
    prompts: Prompts,
    cfg,
    scorer: RewardScorer,
    generator_seed: int,
    timer=None,
    per_prompt_seeds: list[int] | None = None,
) -> Rollouts:
    """Generate G responses for each of the step's prompts (`prepare_prompts`) with the current
    policy, and score them.

    `cfg` supplies group_size, the sampler's settings, generation_batch_size and adv_std_scale;
    `per_prompt_seeds`: each group samples from its own seed (cppo.rl.generation); `timer`
    (cppo.rl.update.Timer) receives the reward phase's seconds.
    """
    samples = prompts.samples
    G = cfg.group_size
    token_id = model.config.image_token_id
    batch_b = prompts.batch
    rows = [b for b in range(len(samples)) for _ in range(G)]  # (N,) prompt of each row
    device = compute_device(model)
    # FSDP: one all-gather for the whole generation; bf16 compute under --dtype bfloat16
    with gathered(model), autocast(device, resolve_dtype(cfg.dtype, device)):
        # memory-sized rows are agreed over the ranks here (a collective every rank reaches)
        per_call = generation_rows(model, cfg, batch_b["input_ids"].shape[1])
        ids, mask = generate_groups(
            model, processor, batch_b, cfg, generator_seed, per_prompt_seeds, token_id, per_call
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
    text_n = take_rows({k: v for k, v in batch_b.items() if k in ROW_KEYS}, rows, token_id)  # no images
    return Rollouts(
        inputs=append_responses(text_n, ids, mask),
        response_ids=ids,
        response_mask=mask,
        has_image=has_image,
        truncated=truncated_rows(ids, mask, end_ids),
        pixel_values=batch_b.get("pixel_values"),
        image_grid_thw=batch_b.get("image_grid_thw"),
        images_per_prompt=prompts.images_per_prompt,
        views=prompts.views,
        rewards=rewards,
        advantages=advantages,
        texts=texts,
        samples=samples,
        view_records=prompts.view_records,
        reward_result=scored,
        row_draws=cpl_row_draws(prompts.view_seeds, G) if prompts.view_seeds else None,
    )


def cpl_row_draws(view_seeds: list[int], G: int) -> torch.Tensor:
    """(B·G,) one uniform in [0, 1) per row, from its prompt's seed and its place in the group: the
    row's own draw for a fractional --cpl-rows (cppo.loss.cpl_step's `row_draws`), the same whatever
    micro-batch or process the row lands in. A stream of its own, apart from the views' draws."""
    draws = [np.random.default_rng([seed, CPL_ROWS_STREAM]).random(G) for seed in view_seeds]  # B x (G,)
    return torch.from_numpy(np.concatenate(draws)) if draws else torch.zeros(0, dtype=torch.float64)


def truncated_rows(ids: torch.Tensor, mask: torch.Tensor, end_ids: list[int]) -> torch.Tensor:
    """(N,) bool: responses (N, T) with no end token among their own tokens, i.e. cut at
    max_new_tokens (generation stops early only once every row has ended)."""
    return ~(torch.isin(ids, torch.tensor(end_ids)) & mask).any(1)


def select_rows(ro: Rollouts, rows: list[int], image_token_id: int, view: str | None = None) -> dict:
    """Teacher-forcing inputs of `rows` (in the order given), with their prompts' original images, or
    those of `view` ("positive"/"negative") if given: each row's images are its prompt's, expanded
    here for the pass (rows of one prompt given adjacent stay adjacent, so that
    cppo.response_stats.shared_image_features encodes them once)."""
    out = take_rows(ro.inputs, rows, image_token_id)  # prompt_length passes through; no images there
    pixels = ro.pixel_values if view is None else ro.views[view]
    if pixels is not None:
        per_prompt = split_images(pixels, ro.image_grid_thw, ro.images_per_prompt)
        G = ro.group_size
        pix, grid = join_images([per_prompt[r // G] for r in rows])
        if pix is not None:
            out["pixel_values"], out["image_grid_thw"] = pix, grid
    return out


def micro_batches(ro: Rollouts, rows: list[int], size: int, by_length: bool) -> list[list[int]]:
    """`rows` cut into micro-batches of `size` rows (the last one may be smaller).

    `by_length`: the rows are first sorted by their own tokens (prompt + response, longest first), so
    that each micro-batch, trimmed to its longest row, holds little padding; each micro-batch lists
    its rows in step order (a prompt's rows stay adjacent: its images are encoded once). Either way
    the number of micro-batches and their sizes are those of the plain cut."""
    if by_length:
        tokens = ro.inputs["attention_mask"].sum(1)  # (N,)
        rows = sorted(rows, key=lambda r: -int(tokens[r]))  # stable: ties keep step order
    cut = [rows[s : s + size] for s in range(0, len(rows), size)]
    return [sorted(m) for m in cut] if by_length else cut
