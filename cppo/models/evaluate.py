"""Accuracy and format of a model on the shapes task, per question type (the model card's numbers).

    python -m cppo.models.evaluate --model cppo/assets/demo-model --split test --n 400 [--out eval.json]

Greedy decoding, docs/method.md §4 prompt, graded by `cppo.grading.grade`. Items are the split's first
`n` (the ones `export_shapes_dataset(seed=...)` writes). Also reported: accuracy with every image
replaced by a blank one of the background colour, a check that the model looks: a model whose
answers do not change without the image has learned no perception.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import torch
from PIL import Image

from cppo.grading import grade
from cppo.models.build import demo_model_path, load_model_and_processor
from cppo.models.inputs import encode_prompts, generate_responses
from cppo.toy.shapes import BACKGROUND, CHANCE, DEFAULT_IMAGE_SIZE, QUESTION_TYPES, ShapesItem, split_items


@torch.no_grad()
def evaluate_items(
    model,
    processor,
    items: list[ShapesItem],
    batch_size: int = 50,
    max_new_tokens: int = 48,
    blank_images: bool = False,
) -> dict:
    """{"accuracy", "format", "n", "per_type": {type: {"accuracy", "format", "n", "chance"}}, "responses"}."""
    acc: dict[str, list[float]] = defaultdict(list)
    fmt: dict[str, list[float]] = defaultdict(list)
    responses = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        images = [[Image.new("RGB", it.image.size, BACKGROUND) if blank_images else it.image] for it in chunk]
        batch = encode_prompts(processor, [it.question for it in chunk], images)
        ids, mask = generate_responses(
            model, processor, batch, max_new_tokens=max_new_tokens, do_sample=False
        )
        texts = processor.batch_decode(
            ids.masked_fill(~mask, processor.tokenizer.pad_token_id), skip_special_tokens=True
        )
        for it, text in zip(chunk, texts):
            a, f = grade(text, it.answer)
            acc[it.question_type].append(a)
            fmt[it.question_type].append(f)
            responses.append(text)
    n = sum(len(v) for v in acc.values())
    per_type = {
        q: {
            "accuracy": sum(acc[q]) / len(acc[q]),
            "format": sum(fmt[q]) / len(fmt[q]),
            "n": len(acc[q]),
            "chance": CHANCE[q],
        }
        for q in QUESTION_TYPES
        if acc[q]
    }
    return {
        "accuracy": sum(sum(v) for v in acc.values()) / n,
        "format": sum(sum(v) for v in fmt.values()) / n,
        "n": n,
        "chance": sum(CHANCE[it.question_type] for it in items) / n,
        "per_type": per_type,
        "responses": responses,
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
) -> dict:
    """`evaluate_items` on the first n items of a split, plus the blank-image accuracy unless not `blank`."""
    items = split_items(split, n, seed=seed, image_size=image_size)
    result = evaluate_items(model, processor, items, batch_size=batch_size)
    if blank:
        no_image = evaluate_items(model, processor, items, batch_size=batch_size, blank_images=True)
        result["blank_image_accuracy"] = no_image["accuracy"]
    result.update(split=split, seed=seed, image_size=image_size)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    ap.add_argument("--out", default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, processor = load_model_and_processor(args.model)
    result = evaluate_split(
        model,
        processor,
        args.split,
        args.n,
        args.seed,
        args.image_size,
        args.batch_size,
        blank=not args.no_blank,
    )
    result["model"] = args.model
    result["seconds"] = round(time.time() - t0, 1)
    for q, r in result["per_type"].items():
        acc, fmt, chance = r["accuracy"], r["format"], r["chance"]
        print(f"{q:15s} n={r['n']:4d} accuracy={acc:.3f} format={fmt:.3f} chance={chance:.2f}")
    blank = result.get("blank_image_accuracy")
    print(
        f"{'overall':15s} n={result['n']:4d} accuracy={result['accuracy']:.3f} format={result['format']:.3f} "
        f"chance={result['chance']:.3f}" + ("" if blank is None else f" blank-image accuracy={blank:.3f}")
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "responses"}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
