"""Does the model look? Accuracy, consistency and entropy under a preset's views (``cppo-eval --views``).

    from cppo.detect.views_eval import evaluate_views, format_views_table
    report = evaluate_views(model, processor, dataset, preset="paper", draws=2, limit=100)
    print(format_views_table(report))

Each item is answered, with the evaluator's settings (``cppo.models.evaluate.evaluate``: S answers an
item, greedy S = 1 by default), under its clean image I, under K information-preserving views I+ and
K information-removing views I- of a preset (each an entry of that kind chosen uniformly, then its
parameters: ``Preset.draw_view``), and under a blank image (every pixel ``blank_color``, white: the
shapes task's background, so it shows nothing). The clean responses are then teacher-forced under I
and under each I- (``cppo.response_stats.response_stats``, the trainer's and the detector's pass).

Definitions. Item i, answer s = 1..S, draw k = 1..K; ``grade`` is the training grader (last
``\\boxed{}``, math-aware equivalence); a(.) is the answer extracted from a response (its last
``\\boxed{}``); every item weighs the same, as in avg@K; "per type" is the same over the items of one
question type:

- clean accuracy  acc(I)   = mean_i mean_s grade(o_is(I))          (the evaluator's avg@S)
- robustness      acc(I+)  = mean_i mean_k mean_s grade(o_is(I+_ik))
- consistency              = mean_i mean_k mean_s same(a(o_is(I)), a(o_is(I+_ik))), same = both answers
                             present and equal under the grader's equivalence (``answers_match``)
- acc(I-), acc(blank)        as robustness, under the removing views and the blank image
- reliance                 = acc(I) - acc(I-);  blank reliance = acc(I) - acc(blank)
- chance                   = mean_i chance(type_i), from the task's table (shapes: ``cppo.toy.CHANCE``);
                             None when a type has no known chance. acc(I-) - chance and
                             acc(blank) - chance say how far above an image-blind guesser the model
                             stays without the information.
- entropy                  H(I) = mean_i mean_s mean_t H_t(I) over the response tokens of o_is(I)
- entropy shift         dH = mean_i mean_k mean_s mean_t [H_t(I-_ik) - H_t(I)] on o_is(I): the
                             detector's dH_t (docs/method.md §2, logits / ``entropy_temperature``,
                             the rollout temperature) averaged over a response's tokens.

Views are seeded per (seed, item index, kind, draw, image) from a numpy SeedSequence, so an item's
views do not depend on the batch size or ``limit``, and every draw is recorded (entry name and
params) in the report: ``preset.replay_view(image, record)`` gives the view back. Each view pass
calls ``evaluate`` with the same seed and batch layout as the clean pass, so sampled answers
(S > 1) draw from the same generator under every view.

Items without an image are answered (the batch layout stays the clean pass's) but left out of
every number here (``no_image`` counts them). With several processes (``world`` > 1), answering is
split as ``evaluate`` splits it and every process runs every teacher-forced pass (under FSDP those
passes are collectives), so every process returns the same report.

It sits in cppo.detect rather than beside the evaluator in cppo.models because its teacher-forced
pass is cppo.response_stats', which is in cppo.models' own layer (docs/architecture.md).

Letters: N rows (items x S), T response tokens.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from statistics import fmean

import numpy as np
import torch
from PIL import Image

from cppo.grading import answers_match, last_boxed
from cppo.models import append_responses, encode_images, encode_prompts
from cppo.models.evaluate import EvalItem, evaluate
from cppo.perturb import Preset, get_preset
from cppo.prompt import INSTRUCTION
from cppo.response_stats import response_stats

WHITE = (255, 255, 255)
PASSES = ("preserving", "removing")  # view kinds, in the order of their seed code (0, 1)


# ---------------------------------------------------------------- the numbers (pure)


def same_answer(a: str | None, b: str | None) -> bool:
    """Both answers present and equal under the grader's equivalence."""
    return a is not None and b is not None and answers_match(b, a)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return fmean(xs) if xs else None


def item_numbers(item: Mapping) -> dict:
    """One item's numbers from its record (``evaluate_views``' ``items`` entries):
    {"clean", "robustness", "consistency", "removing", "blank", "entropy", "entropy_shift"}."""
    clean = item["clean"]
    consistency = [
        _mean(same_answer(c, p) for c, p in zip(clean["answers"], view["answers"]))
        for view in item["preserving"]
    ]  # [K]
    return {
        "clean": _mean(clean["accuracy"]),
        "robustness": _mean(_mean(v["accuracy"]) for v in item["preserving"]),
        "consistency": _mean(consistency),
        "removing": _mean(_mean(v["accuracy"]) for v in item["removing"]),
        "blank": _mean(item["blank"]["accuracy"]),
        "entropy": _mean(item["entropy"]["clean"]),
        "entropy_shift": _mean(_mean(shifts) for shifts in item["entropy"]["shift"]),
    }


def summarize_views(items: Sequence[Mapping], chance: Mapping[str, float] | None = None) -> dict:
    """Overall and per question type: the means of ``item_numbers`` over the items with an image,
    reliance, chance and the distances to it (definitions in the module docstring)."""
    scored = [(it.get("question_type") or "all", item_numbers(it)) for it in items if it["has_image"]]

    def summary(group: list[tuple[str, dict]]) -> dict:
        out = {"n": len(group)}
        for key in ("clean", "robustness", "consistency", "removing", "blank", "entropy", "entropy_shift"):
            out[key] = _mean(nums[key] for _, nums in group)
        known = [chance.get(t) for t, _ in group] if chance else [None]
        out["chance"] = fmean(known) if group and None not in known else None
        out["reliance"] = _diff(out["clean"], out["removing"])
        out["blank_reliance"] = _diff(out["clean"], out["blank"])
        out["removing_over_chance"] = _diff(out["removing"], out["chance"])
        out["blank_over_chance"] = _diff(out["blank"], out["chance"])
        return out

    report = summary(scored)
    report["no_image"] = sum(1 for it in items if not it["has_image"])
    types = sorted({t for t, _ in scored})
    if types != ["all"]:
        report["per_type"] = {t: summary([s for s in scored if s[0] == t]) for t in types}
    return report


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def view_metrics(report: Mapping) -> dict[str, float]:
    """The trainer's eval/views/* metrics of a report (numbers that are None are left out)."""
    keys = ("robustness", "consistency", "removing", "blank", "entropy_shift")
    return {f"eval/views/{k}": report[k] for k in keys if report.get(k) is not None}


def format_views_table(report: Mapping) -> str:
    """One row per question type, then the overall row: n, acc(I), acc(I+), consistency, acc(I-),
    reliance, acc(blank), chance, dH (nats)."""
    cols = ("clean", "robustness", "consistency", "removing", "reliance", "blank", "chance", "entropy_shift")
    head = f"{'type':<16} {'n':>5} {'clean':>6} {'I+':>6} {'same':>6} {'I-':>6} {'cl-I-':>6} "
    head += f"{'blank':>6} {'chance':>6} {'dH':>7}"
    rows = [head, "-" * len(head)]
    for name, r in [*report.get("per_type", {}).items(), ("overall", report)]:
        cells = ["     -" if r[c] is None else f"{r[c]:>6.3f}" for c in cols[:-1]]
        dh = "      -" if r["entropy_shift"] is None else f"{r['entropy_shift']:>+7.3f}"
        rows.append(f"{name:<16} {r['n']:>5} " + " ".join(cells) + f" {dh}")
    return "\n".join(rows)


# ---------------------------------------------------------------- the passes


def draw_item_views(preset: Preset, images: list, seed: int, index: int, draws: int) -> dict:
    """{kind: [K] of {"views": [records per image], "images": [views]}} of one item."""
    out = {}
    for code, kind in enumerate(PASSES):
        out[kind] = []
        for k in range(draws):
            records, views = [], []
            for j, image in enumerate(images):
                rng = np.random.default_rng(np.random.SeedSequence([seed, index, code, k, j]))
                view, record = preset.draw_view(image, rng, kind)
                views.append(view)
                records.append(record)
            out[kind].append({"views": records, "images": views})
    return out


@torch.no_grad()
def response_entropies(
    model, processor, rows: list[tuple], instruction, temperature: float, batch_size: int, chunk_size: int
) -> tuple[list[float | None], list[list[float | None]]]:
    """Teacher-force each row (question, clean images, [K] removing views, response ids with -1 where
    masked out) under I and every I-: (H(I) per row, [K] dH per row), each the mean over the row's
    response tokens (None for an empty response)."""
    pad = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    device = next(model.parameters()).device
    clean_h: list[float | None] = []
    shifts: list[list[float | None]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        enc = encode_prompts(processor, [r[0] for r in chunk], [r[1] for r in chunk], instruction)
        enc = {k: v.to(device) for k, v in enc.items()}
        T = max(1, max(len(r[3]) for r in chunk))
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)  # (N, T)
        mask = torch.zeros(len(chunk), T, dtype=torch.bool)  # (N, T)
        for i, r in enumerate(chunk):
            row = torch.tensor(r[3], dtype=torch.long)
            ids[i, : len(row)] = row.clamp(min=0).masked_fill(row < 0, pad)
            mask[i, : len(row)] = row >= 0
        ids, mask = ids.to(device), mask.to(device)
        inputs = append_responses(enc, ids, mask)
        h_clean, _ = response_stats(model, inputs, ids, mask, temperature, chunk_size)  # (N, T)
        tokens = mask.sum(1)  # (N,)
        per_draw = []
        for k in range(len(chunk[0][2])):
            pix, grid = encode_images(processor, [r[2][k] for r in chunk])
            if not torch.equal(grid.to(device), enc["image_grid_thw"]):
                raise ValueError("a removing view changed an image's size; views must keep width and height")
            h_minus, _ = response_stats(model, inputs, ids, mask, temperature, chunk_size, pix.to(device))
            per_draw.append(((h_minus - h_clean) * mask).sum(1) / tokens.clamp(min=1))  # (N,)
        mean_clean = ((h_clean * mask).sum(1) / tokens.clamp(min=1)).tolist()
        for i in range(len(chunk)):
            empty = int(tokens[i]) == 0
            clean_h.append(None if empty else mean_clean[i])
            shifts.append([None if empty else float(d[i]) for d in per_draw])
    return clean_h, shifts


def evaluate_views(
    model,
    processor,
    dataset: Sequence,
    preset: str | Preset = "paper",
    draws: int = 2,
    view_seed: int | None = None,
    blank_color: tuple[int, int, int] = WHITE,
    chance: Mapping[str, float] | None = None,
    entropy_temperature: float = 1.0,
    chunk_size: int = 256,
    clean: Mapping | None = None,
    **answering,
) -> dict:
    """The perception evaluation of the module docstring: ``summarize_views``' report plus ``settings``
    (the views' settings and the preset, to reproduce them) and ``items`` (per item: the answers and grades
    under every image, the view records, the entropies).

    ``answering``: ``evaluate``'s settings (samples, temperature, top_p, max_new_tokens, batch_size,
    seed, limit, instruction, rank, world), the same for every image. ``clean``: a report of
    ``evaluate(..., token_ids=True)`` with those settings, reused for the clean image instead of
    answering again. ``view_seed``: seeds the views (None: ``answering``'s seed, else 0)."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1 (views of each kind per item), got {draws}")
    preset = preset if isinstance(preset, Preset) else get_preset(preset)
    seed = answering.get("seed", 0) if view_seed is None else view_seed
    limit = answering.get("limit")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    prompts = [dataset[i] for i in range(n)]
    if clean is None:
        clean = evaluate(model, processor, prompts, token_ids=True, **answering)
    if len(clean["questions"]) != n or "response_ids" not in clean["questions"][0]:
        raise ValueError("clean must be evaluate(..., token_ids=True)'s report on the same items and limit")
    views = [draw_item_views(preset, list(p.images), seed, i, draws) for i, p in enumerate(prompts)]

    def answered(images_of) -> list[dict]:  # evaluate on the same items with other images
        items = [
            EvalItem(p.question, p.answer, images_of(i, p), p.question_type, getattr(p, "source", ""))
            for i, p in enumerate(prompts)
        ]
        return evaluate(model, processor, items, **answering)["questions"]

    under: dict[str, list[list[dict]]] = defaultdict(list)  # kind -> [K] of per-item answers
    for kind in PASSES:
        for k in range(draws):
            under[kind].append(answered(lambda i, p, kind=kind, k=k: views[i][kind][k]["images"]))
    blank = answered(lambda i, p: [Image.new("RGB", im.size, blank_color) for im in p.images])

    questions = clean["questions"]
    rows = [
        (p.question, list(p.images), [views[i]["removing"][k]["images"] for k in range(draws)], ids)
        for i, p in enumerate(prompts)
        if p.images
        for ids in questions[i]["response_ids"]
    ]
    instruction = answering.get("instruction", INSTRUCTION)
    batch = answering.get("batch_size", 16)
    h_clean, shifts = response_entropies(
        model, processor, rows, instruction, entropy_temperature, batch, chunk_size
    )
    entropies = iter(zip(h_clean, shifts))  # rows in item order, S a question with an image
    items = []
    for i, p in enumerate(prompts):
        q = questions[i]
        mine = [next(entropies) for _ in q["response_ids"]] if p.images else []
        item = {
            "source": q["source"],
            "question_type": p.question_type,
            "answer": p.answer,
            "has_image": bool(p.images),
            "clean": _answers(q),
            "blank": _answers(blank[i]),
            "entropy": {
                "clean": [h for h, _ in mine],
                "shift": [[d[k] for _, d in mine] for k in range(draws)],
            },
        }
        for kind in PASSES:
            item[kind] = [
                {"views": views[i][kind][k]["views"], **_answers(under[kind][k][i])} for k in range(draws)
            ]
        items.append(item)
    report = summarize_views(items, chance)
    report["settings"] = {
        "preset": preset.to_dict(),
        "draws": draws,
        "seed": seed,
        "seeding": "numpy SeedSequence([seed, item index, kind (0 preserving, 1 removing), draw, image])",
        "blank_color": list(blank_color),
        "entropy_temperature": entropy_temperature,
        **{k: clean[k] for k in ("samples", "temperature", "top_p", "max_new_tokens") if k in clean},
    }
    report["items"] = items
    return report


def _answers(question: Mapping) -> dict:
    """The extracted answers, grades and responses of one evaluated question."""
    return {
        "answers": [last_boxed(r) for r in question["responses"]],
        "accuracy": question["accuracy"],
        "responses": question["responses"],
    }
