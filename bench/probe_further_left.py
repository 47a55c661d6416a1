"""Where does a model decide `further_left`? The deciding word of its reasoning sentence, by separation.

    python bench/probe_further_left.py --model cppo/assets/demo-model --n 300   # ~10 s on 2 cores

The warm start's further_left sentence is "The A is left|right of the B." with A and B in the
question's order, so one word decides. For the first --n further_left items of the test split it
teacher-forces "<think>The A is" after the prompt and reads the model's probabilities of " left"
and " right" at the next position: the probability of the true word and whether the true word is
the likelier one, overall and by the horizontal distance between the two shapes' centres (px).
A model that perceives the relation puts more than 0.5 on the true word, more so the further apart
the shapes are; 0.5 in every bin means the word carries nothing the model saw. Prints a table.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from cppo.models import demo_model_path, load_model_and_processor
from cppo.models.inputs import append_responses, encode_prompts, response_logits, right_pad
from cppo.toy.shapes import further_left_names as names
from cppo.toy.shapes import split_items

BINS = ((8, 16), (16, 28), (28, 45), (45, 1000))  # |x_A - x_B| in px; 28 px is one image-token column


def word_probs(model, processor, items, batch_size: int = 32) -> np.ndarray:
    """(n, 2) probabilities of " left" and " right" after "<think>The A is", one row per item."""
    tok = processor.tokenizer
    left, right = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" left", " right"))
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        # the prefix plus one placeholder token, so that the logits at its position predict the word
        rows = [
            tok(f"<think>The {names(it.question)[0]} is left", add_special_tokens=False)["input_ids"]
            for it in chunk
        ]
        ids, mask = right_pad(rows, tok.pad_token_id)  # (N, T) each
        batch = encode_prompts(processor, [it.question for it in chunk], [[it.image] for it in chunk])
        with torch.no_grad():
            logits = response_logits(model, append_responses(batch, ids, mask))  # (N, T, V)
        for j, r in enumerate(rows):
            p = torch.softmax(logits[j, len(r) - 1].float(), -1)
            out.append((p[left].item(), p[right].item()))
    return np.array(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: the bundled demo model")
    ap.add_argument("--n", type=int, default=300, help="further_left items of the test split")
    args = ap.parse_args(argv)
    model, processor = load_model_and_processor(args.model or demo_model_path())
    model.eval()
    pool = split_items("test", 6 * args.n)
    items = [it for it in pool if it.question_type == "further_left"][: args.n]
    probs = word_probs(model, processor, items)
    truth_left = np.array([it.answer == names(it.question)[0] for it in items])
    p_true = np.where(truth_left, probs[:, 0], probs[:, 1])
    right = p_true > np.where(truth_left, probs[:, 1], probs[:, 0])
    dx = []
    for it in items:
        xs = {f"{s.color} {s.kind}": s.x for s in it.scene.shapes}
        a, b = names(it.question)
        dx.append(abs(xs[a] - xs[b]))
    dx = np.array(dx)
    print("| centres apart (px) | items | P(true word) | true word likelier % |")
    print("|---|---|---|---|")
    for lo, hi in BINS:
        m = (dx >= lo) & (dx < hi)
        label = f"{lo}-{hi}" if hi < 1000 else f"{lo}+"
        print(f"| {label} | {m.sum()} | {p_true[m].mean():.3f} | {100 * right[m].mean():.1f} |")
    print(f"| all | {len(items)} | {p_true.mean():.3f} | {100 * right.mean():.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
