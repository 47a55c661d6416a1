"""Supervised warm start of a tiny Qwen2.5-VL on the shapes task: the bundled demo model's recipe.

    python -m cppo.models.warmstart --out runs/warmstart-stage1 --steps 8500 --seed 1 ...

(the first of the three stages in MODEL_CARD.md; the later ones add `--init`).

Every step draws a fresh batch of shapes items (no epochs, no overfitting to a fixed set) and
teacher-forces the docs/method.md §4 answer `<think>one sentence naming what decides it</think>
\\boxed{answer}<|im_end|>` after the §4 prompt, with cross-entropy on the response tokens only.
AdamW (betas 0.9/0.98, weight decay on matrices only), gradient clip 1.0, linear warmup then
cosine to 10 % of the peak learning rate, as measured in docs/models.md (lr 6e-4 learns to
look; 2e-3 gives a blind model).

The live check that the model looks: the loss of the best image-blind predictor (the entropy of
the response given the question, per response token) is computed from the generator and printed
next to the training loss. Format alone is learned in ~150 steps by a blind model; only a loss
below that floor means the image is being used.

The checkpoint is saved in bfloat16 (a few MB), then evaluated on the test split with
`cppo.models.evaluate` (`eval.json`: the first `--eval-n` items; `eval_slice.json`: the first 100,
which CI re-scores), and `MODEL_CARD.md` is written from those files (`cppo.models.card`).

The items only the warm start uses (`describe_item`, `relabel_item`) live beside the loop that
mixes them into its batches. Every flag is recorded in `warmstart.json`, from which the card prints
the recipe (and `--init` reads the model's shape).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from cppo.models.build import TinyVLMConfig, build_tiny_model, load_model_and_processor
from cppo.models.card import main as card_main
from cppo.models.evaluate import main as evaluate_main
from cppo.models.inputs import append_responses, encode_prompts, response_logits, right_pad
from cppo.toy.shapes import (
    COLORS,
    DEFAULT_IMAGE_SIZE,
    QUESTION_TYPES,
    ShapesItem,
    further_left_names,
    make_item,
    make_scene,
    render,
    target_response,
)

CI_SLICE = 100  # first test items re-scored by tests/test_demo_model.py


def describe_item(rng: np.random.Generator, image_size: int = DEFAULT_IMAGE_SIZE) -> ShapesItem:
    """An auxiliary training item, dense in perception: count all shapes, naming each left to right.

    "How many shapes are there?" -> "<think>I see a red circle, a blue square and a green
    triangle.</think> \\boxed{3}". Every colour and shape word of the reasoning is read off the
    image, so the vision path gets several supervised tokens per item instead of one. Used in the
    warm start only (`--describe-frac`); it is not one of the task's question types.
    """
    scene = make_scene(rng, image_size)
    names = [f"a {s.color} {s.kind}" for s in sorted(scene.shapes, key=lambda s: s.x)]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return ShapesItem(
        render(scene), "How many shapes are there?", str(len(names)), "describe", scene, f"I see {listed}."
    )


def relabel_item(rng: np.random.Generator, item: ShapesItem) -> ShapesItem:
    """The item with another valid answer of its question, stated in both the reasoning and the box.

    The warm start's answer noise (`--relabel-frac`): a share q of the targets names an answer
    that is wrong for this image but well-formed for the question ("I see 2 red shapes." ->
    \\boxed{2} where there is 1), chosen uniformly among the question's other answers. The target
    never contradicts itself, so the model learns a calibrated mixture: seeing perfectly, it ranks
    the true answer first (greedy stays right) yet samples another one about q of the time at
    temperature 1. That gap between sampled and greedy accuracy is the headroom RL with a
    verifiable reward closes by sharpening; it is synthetic, and docs/results.md says so.
    Describe items are never relabelled.
    """
    scene, q = item.scene, item.question
    if item.question_type == "count_color":
        color = q.split()[2]
        k = int(rng.choice([n for n in range(4) if str(n) != item.answer]))
        return ShapesItem(item.image, q, str(k), item.question_type, scene, f"I see {k} {color} shapes.")
    if item.question_type == "color_of_shape":
        kind = q.rstrip("?").split()[-1]
        color = str(rng.choice([c for c in COLORS if c != item.answer]))
        return ShapesItem(item.image, q, color, item.question_type, scene, f"The {kind} is {color}.")
    if item.question_type == "further_left":
        a, b = further_left_names(q)
        other = b if item.answer == a else a
        side = "left" if other == a else "right"
        return ShapesItem(item.image, q, other, item.question_type, scene, f"The {a} is {side} of the {b}.")
    if item.question_type == "more_than":
        words = q.split()  # Are there more C1 shapes than C2 shapes?
        c1, c2 = words[3], words[6]
        k1, k2 = scene.count(color=c1), scene.count(color=c2)
        answer = "no" if item.answer == "yes" else "yes"
        return ShapesItem(
            item.image, q, answer, item.question_type, scene, f"I see {k2} {c1} and {k1} {c2} shapes."
        )
    return item


def response_batch(tokenizer, items: list[ShapesItem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded target responses, each ending with <|im_end|>: ids (N, T), mask (N, T)."""
    rows = [
        tokenizer(target_response(it) + "<|im_end|>", add_special_tokens=False)["input_ids"] for it in items
    ]
    return right_pad(rows, tokenizer.pad_token_id)


def blind_floor(tokenizer, n: int = 20000, seed: int = 99, image_size: int = DEFAULT_IMAGE_SIZE) -> float:
    """Per-token loss (nats) of the best image-blind predictor: H(response | question) / mean tokens.

    Plug-in estimate from n generated items: -log of each response's frequency among the items
    that share its question, summed, over the summed response lengths (with <|im_end|>).
    """
    rng = np.random.default_rng(seed)
    by_q: dict[str, Counter] = defaultdict(Counter)
    tokens = 0
    for _ in range(n):
        it = make_item(rng, image_size)
        by_q[it.question][target_response(it)] += 1
        tokens += len(tokenizer(target_response(it) + "<|im_end|>")["input_ids"])
    nats = sum(-c * math.log(c / sum(cnt.values())) for cnt in by_q.values() for c in cnt.values())
    return nats / tokens


def _question_type(rng: np.random.Generator, weights: np.ndarray | None) -> str | None:
    """A question type drawn with the recipe's weights, or None (make_item's uniform draw)."""
    return None if weights is None else QUESTION_TYPES[int(rng.choice(len(QUESTION_TYPES), p=weights))]


def lr_at(step: int, steps: int, warmup: int, peak: float, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0, help="model init and training-stream seed")
    ap.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    ap.add_argument(
        "--describe-frac",
        type=float,
        default=0.0,
        help="fraction of each batch that is the auxiliary describe-all-shapes item",
    )
    ap.add_argument(
        "--relabel-frac",
        type=float,
        default=0.0,
        help="share of task items whose target names another valid answer (relabel_item)",
    )
    ap.add_argument(
        "--type-weights",
        type=float,
        nargs=4,
        default=None,
        metavar="W",
        help="relative frequency of each question type (count_color color_of_shape further_left more_than)",
    )
    ap.add_argument(
        "--init",
        default=None,
        help="continue from this checkpoint (an earlier stage of the recipe) instead of a new model",
    )
    ap.add_argument("--layers", type=int, default=2, help="text decoder layers (TinyVLMConfig.num_layers)")
    ap.add_argument("--hidden", type=int, default=128, help="text width (TinyVLMConfig.hidden_size)")
    ap.add_argument(
        "--vision-hidden", type=int, default=64, help="vision tower width; its MLP is twice as wide"
    )
    ap.add_argument("--vision-depth", type=int, default=2, help="vision tower blocks")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=400, help="test items evaluated after training (0: none)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    config = TinyVLMConfig(
        image_size=args.image_size,
        num_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        vision_hidden_size=args.vision_hidden,
        vision_depth=args.vision_depth,
        vision_intermediate_size=2 * args.vision_hidden,
    )
    if args.init:  # a later stage: the earlier stage's weights (saved in bf16) trained on in fp32
        model, processor = load_model_and_processor(args.init)
        model.train()
        config = TinyVLMConfig(**json.loads((Path(args.init) / "warmstart.json").read_text())["model"])
    else:
        model, processor = build_tiny_model(config, seed=args.seed)
    weights = None if args.type_weights is None else np.array(args.type_weights) / sum(args.type_weights)
    tok = processor.tokenizer
    floor = blind_floor(tok, image_size=args.image_size)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}  image-blind loss floor {floor:.4f} nats/token", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    rng = np.random.default_rng([args.seed, 7])  # a stream of its own: never the export splits' seeds
    model.train()
    t0, ema, log = time.time(), None, []
    for step in range(args.steps):
        items = [
            describe_item(rng, args.image_size)
            if rng.random() < args.describe_frac
            else make_item(rng, args.image_size, _question_type(rng, weights))
            for _ in range(args.batch_size)
        ]
        items = [relabel_item(rng, it) if rng.random() < args.relabel_frac else it for it in items]
        batch = encode_prompts(processor, [it.question for it in items], [[it.image] for it in items])
        ids, mask = response_batch(tok, items)
        inputs = append_responses(batch, ids, mask)
        logits = response_logits(model, inputs)  # (N, T, V)
        loss = torch.nn.functional.cross_entropy(logits[mask], ids[mask])  # token mean
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.warmup, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % args.log_every == 0 or step == 0:
            below = "below" if ema < floor else "above"
            print(
                f"step {step + 1:5d}  loss {ema:.4f} ({below} blind floor {floor:.4f})  "
                f"lr {g['lr']:.2e}  {time.time() - t0:.0f}s",
                flush=True,
            )
            log.append({"step": step + 1, "loss_ema": round(ema, 5), "seconds": round(time.time() - t0, 1)})
    train_seconds = time.time() - t0
    model.eval()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    processor.save_pretrained(out)
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "log_every")}
    earlier = json.loads((Path(args.init) / "warmstart.json").read_text()) if args.init else {}
    meta = {
        "recipe": recipe,
        # every stage of the recipe in order, each one command (a stage after the first has --init)
        "stages": earlier.get("stages", [earlier["recipe"]] if earlier else []) + [recipe],
        "stage_seconds": earlier.get("stage_seconds", [earlier.get("train_seconds")] if earlier else [])
        + [round(train_seconds, 1)],
        "model": asdict(config),
        "parameters": n_params,
        "blind_loss_floor": floor,
        "final_loss_ema": ema,
        "train_seconds": round(train_seconds, 1),
        "torch_threads": args.threads,
        "log": log,
    }
    (out / "warmstart.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved {out} after {train_seconds:.0f}s", flush=True)

    if args.eval_n:
        common = [
            "--model",
            str(out),
            "--split",
            "test",
            "--seed",
            "0",
            "--image-size",
            str(args.image_size),
            "--threads",
            str(args.threads),
        ]
        evaluate_main([*common, "--n", str(args.eval_n), "--sampled", "4", "--out", str(out / "eval.json")])
        evaluate_main([*common, "--n", str(CI_SLICE), "--no-blank", "--out", str(out / "eval_slice.json")])
        card_main([str(out)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
