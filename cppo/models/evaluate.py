"""The evaluator: avg@K accuracy, format rate and pass@K of a model on prompts, per question type.

One implementation for every caller: ``cppo-eval`` (cli/eval.py), the trainer's periodic
evaluation (``cppo.rl.loop`` imports ``evaluate`` from here), and the demo model's recipe, which
scores the shapes task from here:

    python -m cppo.models.evaluate --model cppo/assets/demo-model --split test --n 400 [--out eval.json]

Each question is answered K times; its accuracy is the mean of the K grades and avg@K is the mean
of that over questions (so every question weighs the same, whatever K). pass@K (at least one of
the K correct) comes along for free. Grading is the training reward's (``cppo.grading.grade``:
the last ``\\boxed{}`` with math-aware equivalence; format = think tags then a boxed answer), with
the docs/method.md §4 prompt (``cppo.models.encode_prompts``).

Temperature ``None`` means greedy for K = 1 and temperature 1.0 (the rollout temperature) for
K > 1; K > 1 at temperature 0 is refused, since it would average K copies of one greedy answer.
Sampling is seeded per batch, so a run repeats exactly on the same machine.

A prompt is anything with the fields of ``EvalItem`` (``cppo.rl.data.Sample`` has them); a dataset
is a sequence of prompts (``cppo.rl.data.PromptDataset``, a list).

The demo recipe (``evaluate_split``, ``main``): greedy decoding on the first ``n`` items of a shapes
split (the ones ``export_shapes_dataset(seed=...)`` writes), with each question type's chance
level, and the accuracy with every image replaced by a blank one of the background colour, a check
that the model looks: a model whose answers do not change without the image has learned no
perception. It writes the ``eval.json`` / ``eval_slice.json`` the model card is made from
(``cppo.models.card``).

The shapes recipe (chance levels, the blank-image check, the reasoning agreement, avg@K at the
rollout temperature) sits beside the evaluator it calls, so the model card's numbers and
``cppo-eval``'s come from the same code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from cppo.grading import grade
from cppo.models.build import demo_model_path, load_model_and_processor
from cppo.models.inputs import encode_prompts, generate_responses
from cppo.models.model_dir import ModelError
from cppo.prompt import INSTRUCTION
from cppo.toy.shapes import (
    BACKGROUND,
    CHANCE,
    DEFAULT_IMAGE_SIZE,
    QUESTION_TYPES,
    ShapesItem,
    reasoning_agrees,
    split_items,
)


@dataclass(frozen=True)
class EvalItem:
    """The fields of a prompt that ``evaluate`` reads."""

    question: str
    answer: str
    images: list[Image.Image] = field(default_factory=list)
    question_type: str | None = None
    source: str = ""


def resolve_temperature(samples: int, temperature: float | None) -> float:
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if temperature is None:
        return 0.0 if samples == 1 else 1.0
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == 0 and samples > 1:
        raise ValueError(
            f"{samples} samples at temperature 0 are {samples} copies of one greedy answer: "
            "set a temperature > 0, or --samples 1"
        )
    return temperature


def score(questions: list[dict]) -> dict:
    """Aggregate graded questions ``{"question_type", "accuracy": [K], "format": [K]}`` into the report."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for q in questions:
        groups[q.get("question_type") or "all"].append(q)

    def summary(qs: list[dict]) -> dict:
        return {
            "n": len(qs),
            "accuracy": sum(sum(q["accuracy"]) / len(q["accuracy"]) for q in qs) / len(qs),
            "format": sum(sum(q["format"]) / len(q["format"]) for q in qs) / len(qs),
            "pass_at_k": sum(max(q["accuracy"]) for q in qs) / len(qs),
        }

    report = summary(questions)
    if set(groups) != {"all"}:
        report["per_type"] = {t: summary(groups[t]) for t in sorted(groups)}
    return report


@torch.no_grad()
def evaluate(
    model,
    processor,
    dataset: Sequence,
    samples: int = 1,
    temperature: float | None = None,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    limit: int | None = None,
    instruction: str | None = INSTRUCTION,
    rank: int = 0,
    world: int = 1,
    token_ids: bool = False,
) -> dict:
    """Answer each question ``samples`` times and grade; returns ``score``'s report plus ``questions``
    (per question: source, question_type, answer, responses, accuracy and format lists). Each prompt
    is the question followed by ``instruction`` (None: the question alone). ``token_ids``: each question
    also holds ``response_ids``, its responses' generated token ids up to the end token, with -1 where
    generation masked a token out (what ``cppo.detect.views_eval`` teacher-forces).

    ``world`` > 1 (a collective over torch.distributed's ``world`` processes): this process
    (``rank``) answers batches rank, rank + world, ... of the one-process run, each with that
    batch's seed, so every batch is answered as one process answers it; the graded questions are
    gathered and every process returns the one-process report, value for value."""
    temperature = resolve_temperature(samples, temperature)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    per_batch = max(1, batch_size // samples)  # questions per generate call; each repeated K times
    pad = processor.tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    answered: dict[int, list[dict]] = {}  # batch index -> its graded questions, this process's batches
    for b, start in enumerate(range(0, n, per_batch)):
        if b % world != rank:
            continue
        items = [dataset[i] for i in range(start, min(n, start + per_batch))]
        rep = [s for s in items for _ in range(samples)]  # (N = questions x K)
        batch = encode_prompts(processor, [s.question for s in rep], [s.images for s in rep], instruction)
        ids, mask = generate_responses(
            model,
            processor,
            batch,
            max_new_tokens=max_new_tokens,
            temperature=temperature or 1.0,
            top_p=top_p,
            do_sample=temperature > 0,
            generator_seed=seed * 100_003 + b,
        )
        texts = processor.batch_decode(ids.masked_fill(~mask.to(ids.device), pad), skip_special_tokens=True)
        questions = answered[b] = []
        for j, s in enumerate(items):
            responses = texts[j * samples : (j + 1) * samples]
            grades = [grade(r, s.answer) for r in responses]
            questions.append(
                {
                    "source": s.source,
                    "question_type": s.question_type,
                    "answer": s.answer,
                    "responses": responses,
                    "accuracy": [a for a, _ in grades],
                    "format": [f for _, f in grades],
                }
            )
            if token_ids:
                rows = range(j * samples, (j + 1) * samples)
                questions[-1]["response_ids"] = [_kept_ids(ids[r], mask[r]) for r in rows]
    model.train(was_training)
    questions = [q for _, qs in sorted(_gathered(answered, world).items()) for q in qs]
    report = score(questions)
    report.update(
        samples=samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        questions=questions,
    )
    return report


def _kept_ids(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    """One generated row (T,) up to its last kept token, with -1 at tokens the mask drops."""
    kept = mask.bool().tolist()
    last = max((t for t, m in enumerate(kept) if m), default=-1)
    return [i if m else -1 for i, m in zip(ids[: last + 1].tolist(), kept)]


def _gathered(answered: dict[int, list[dict]], world: int) -> dict[int, list[dict]]:
    """Every process's answered batches (one all_gather when world > 1)."""
    if world == 1:
        return answered
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, answered)
    return {b: qs for part in parts for b, qs in part.items()}


def format_table(report: dict) -> str:
    """A short fixed-width table: one row per question type, then the overall row."""
    k = report.get("samples", 1)
    head = f"{'type':<16} {'n':>5} {f'avg@{k}':>8} {'format':>7} {f'pass@{k}':>7}"
    rows = [head, "-" * len(head)]
    for name, r in [*report.get("per_type", {}).items(), ("overall", report)]:
        rows.append(
            f"{name:<16} {r['n']:>5} {r['accuracy']:>8.3f} {r['format']:>7.3f} {r['pass_at_k']:>7.3f}"
        )
    return "\n".join(rows)


# ---------------------------------------------------------------- the demo model's recipe


def _shapes_prompts(items: list[ShapesItem], split: str, blank_images: bool) -> list[EvalItem]:
    return [
        EvalItem(
            question=it.question,
            answer=it.answer,
            images=[Image.new("RGB", it.image.size, BACKGROUND) if blank_images else it.image],
            question_type=it.question_type,
            source=f"{split}:{i}",
        )
        for i, it in enumerate(items)
    ]


def evaluate_shapes(
    model,
    processor,
    items: list[ShapesItem],
    batch_size: int = 50,
    max_new_tokens: int = 48,
    blank_images: bool = False,
    split: str = "test",
    samples: int = 1,
) -> dict:
    """``evaluate`` of shapes items, with chance levels: {"accuracy", "format", "agreement", "n",
    "chance", "per_type": {type: {"accuracy", "format", "agreement", "n", "chance"}}, "responses"}
    (types in task order). Greedy for ``samples`` 1, else avg@K at temperature 1.0. ``agreement`` is
    the share of responses whose reasoning sentence is well-formed and implies the boxed answer
    (``cppo.toy.shapes.reasoning_agrees``); ``responses`` holds each question's first response."""
    report = evaluate(
        model,
        processor,
        _shapes_prompts(items, split, blank_images),
        samples=samples,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    agree: dict[str, list[float]] = defaultdict(list)
    for it, q in zip(items, report["questions"]):
        agree[it.question_type] += [
            float(reasoning_agrees(it.question_type, it.question, r)) for r in q["responses"]
        ]
    per_type = report.get("per_type", {})
    return {
        "accuracy": report["accuracy"],
        "format": report["format"],
        "agreement": sum(sum(a) for a in agree.values()) / sum(len(a) for a in agree.values()),
        "n": report["n"],
        "samples": samples,
        "chance": sum(CHANCE[it.question_type] for it in items) / report["n"],
        "per_type": {
            q: {
                "accuracy": per_type[q]["accuracy"],
                "format": per_type[q]["format"],
                "agreement": sum(agree[q]) / len(agree[q]),
                "n": per_type[q]["n"],
                "chance": CHANCE[q],
            }
            for q in QUESTION_TYPES
            if q in per_type
        },
        "responses": [q["responses"][0] for q in report["questions"]],
    }


def evaluate_split(
    model,
    processor,
    split: str = "test",
    n: int = 400,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    batch_size: int = 50,
    blank: bool = True,
    max_new_tokens: int = 48,
    sampled: int = 0,
) -> dict:
    """Greedy `evaluate_shapes` on the first n items of a split, plus the blank-image accuracy unless
    not `blank`, and with `sampled` K > 0 the avg@K at temperature 1.0 (``sampled``: its accuracy,
    agreement and per-type accuracy), the rollout temperature: the gap between it and the greedy
    accuracy is what RL can close by sharpening."""
    items = split_items(split, n, seed=seed, image_size=image_size)
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, split=split)
    result = evaluate_shapes(model, processor, items, **kw)
    if blank:
        no_image = evaluate_shapes(model, processor, items, blank_images=True, **kw)
        result["blank_image_accuracy"] = no_image["accuracy"]
    if sampled:
        at_t1 = evaluate_shapes(model, processor, items, samples=sampled, **kw)
        result["sampled"] = {
            "samples": sampled,
            "temperature": 1.0,
            "accuracy": at_t1["accuracy"],
            "agreement": at_t1["agreement"],
            "per_type": {q: r["accuracy"] for q, r in at_t1["per_type"].items()},
        }
    result.update(split=split, seed=seed, image_size=image_size)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m cppo.models.evaluate",
        description="Accuracy and format of a model on the shapes task, per question type",
    )
    ap.add_argument(
        "--model", default=str(demo_model_path()), help="checkpoint dir (default: the bundled demo)"
    )
    ap.add_argument("--split", default="test", choices=["train", "val", "test"])
    ap.add_argument("--n", type=int, default=400, help="first n items of the split")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (as export_shapes_dataset)")
    ap.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-blank", action="store_true", help="skip the blank-image run")
    ap.add_argument("--sampled", type=int, default=0, help="also avg@K at temperature 1.0 (0: skip)")
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        model, processor = load_model_and_processor(args.model)
    except (ModelError, FileNotFoundError) as e:  # a broken or missing model folder: one line
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    result = evaluate_split(
        model,
        processor,
        args.split,
        args.n,
        args.seed,
        args.image_size,
        args.batch_size,
        blank=not args.no_blank,
        sampled=args.sampled,
    )
    result["model"] = args.model
    result["seconds"] = round(time.time() - t0, 1)
    for q, r in result["per_type"].items():
        acc, fmt, chance = r["accuracy"], r["format"], r["chance"]
        agree = r["agreement"]
        print(
            f"{q:15s} n={r['n']:4d} accuracy={acc:.3f} format={fmt:.3f} "
            f"agreement={agree:.3f} chance={chance:.2f}"
        )
    blank = result.get("blank_image_accuracy")
    print(
        f"{'overall':15s} n={result['n']:4d} accuracy={result['accuracy']:.3f} format={result['format']:.3f} "
        f"chance={result['chance']:.3f}" + ("" if blank is None else f" blank-image accuracy={blank:.3f}")
    )
    if "sampled" in result:
        k = result["sampled"]["samples"]
        print(f"avg@{k} at temperature 1.0: accuracy={result['sampled']['accuracy']:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "responses"}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
