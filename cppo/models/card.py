"""Write the demo model's MODEL_CARD.md from the JSON its warm start and evaluations left behind.

    python -m cppo.models.card cppo/assets/demo-model

Reads `warmstart.json` (recipe, size, time), `eval.json` (test split, per question type) and
`eval_slice.json` (the first items of the test split, the slice the CI test re-scores), so every
number in the card is one a command printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pct(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.1f}"


def _command(r: dict, out: str, index: int) -> str:
    """The warm-start command line of one stage of the recipe."""
    cmd = (
        f"python -m cppo.models.warmstart --out {out} "
        f"--steps {r['steps']} --seed {r['seed']} --batch-size {r['batch_size']} "
        f"--lr {r['lr']} --warmup {r['warmup']} --threads {r['threads']}"
    )
    if r.get("init"):
        cmd += f" --init runs/warmstart-stage{index}"
    for flag, key, default in (
        ("--describe-frac", "describe_frac", 0.0),
        ("--relabel-frac", "relabel_frac", 0.0),
        ("--layers", "layers", 2),
        ("--hidden", "hidden", 128),
        ("--vision-hidden", "vision_hidden", 64),
        ("--vision-depth", "vision_depth", 2),
    ):
        if not r.get("init") or key not in ("layers", "hidden", "vision_hidden", "vision_depth"):
            if r.get(key, default) != default:
                cmd += f" {flag} {r[key]}"
    if r.get("type_weights"):
        cmd += " --type-weights " + " ".join(f"{w:g}" for w in r["type_weights"])
    return cmd


def _stage_line(r: dict, index: int, n: int, seconds: float | None) -> str:
    weights = r.get("type_weights")
    mix = (
        "question types in the proportions " + ":".join(f"{w:g}" for w in weights)
        if weights
        else "question types uniform"
    )
    took = "" if seconds is None else f", {seconds / 60:.0f} min"
    start = "from the previous stage" if r.get("init") else "from a new model"
    return (
        f"- Stage {index + 1} of {n} ({start}{took}): {r['steps']} steps, lr {r['lr']}, "
        f"warmup {r['warmup']}, "
        f"{100 * r.get('describe_frac', 0.0):.0f} % describe items, {100 * r.get('relabel_frac', 0.0):.0f} % "
        f"relabelled, {mix}."
    )


def render_card(model_dir: Path) -> str:
    ws = json.loads((model_dir / "warmstart.json").read_text())
    ev = json.loads((model_dir / "eval.json").read_text())
    sl = json.loads((model_dir / "eval_slice.json").read_text())
    r = ws["recipe"]
    size_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
    image_tokens = (ws["model"]["image_size"] // 28) ** 2  # 14 px patches merged 2 x 2
    sampled = ev.get("sampled", {}).get("per_type", {})
    rows = "\n".join(
        f"| {q} | {v['n']} | {100 * v['accuracy']:.1f} | {_pct(sampled.get(q))} | {100 * v['format']:.1f} | "
        f"{_pct(v.get('agreement'))} | {100 * v['chance']:.0f} |"
        for q, v in ev["per_type"].items()
    )
    stages = ws.get("stages", [r])
    threads = f"{ws['torch_threads']} torch thread" + ("s" if ws["torch_threads"] != 1 else "")
    seconds = ws.get("stage_seconds", [ws["train_seconds"]])
    out = "cppo/assets/demo-model"
    cmds = [
        _command(st, out if i == len(stages) - 1 else f"runs/warmstart-stage{i + 1}", i)
        for i, st in enumerate(stages)
    ]
    stage_lines = "\n".join(
        _stage_line(st, i, len(stages), sec) for i, (st, sec) in enumerate(zip(stages, seconds))
    )
    m = ws["model"]
    acc, fmt = 100 * ev["accuracy"], 100 * ev["format"]
    weak = [q for q, v in ev["per_type"].items() if v["accuracy"] < v["chance"] + 0.2]
    below = f"Less than 20 points above chance on {', '.join(weak)}.\n" if weak else ""
    relabel = r.get("relabel_frac", 0.0)
    relabel_line = (
        f"{100 * relabel:.0f} % of the task items carry another valid answer of their question, stated in "
        "both the reasoning and the box (`relabel_item`): the targets never contradict themselves, so the "
        "model learns a calibrated mixture that ranks the true answer first but samples another one "
        "part of the time at temperature 1. This is synthetic answer noise, put there on purpose to give "
        "RL with a verifiable reward something to sharpen (docs/results.md).\n"
        if relabel
        else ""
    )
    s_ev = ev.get("sampled")
    sampled_line = (
        f"Sampled at the rollout temperature 1.0 (avg@{s_ev['samples']}), the accuracy is "
        f"{100 * s_ev['accuracy']:.1f} %: the gap to the greedy {100 * ev['accuracy']:.1f} % is the "
        "headroom RL closes by making the answers the model already ranks first more likely.\n"
        if s_ev
        else ""
    )
    if r.get("describe_frac", 0.0) > 0:
        loss_line = (
            f"Final training loss {ws['final_loss_ema']:.4f} nats/token; it includes the describe items, so "
            f"it is not comparable to the task's image-blind floor ({ws['blind_loss_floor']:.4f}): the "
            "blank-image accuracy below is the check that the model looks."
        )
    else:
        verdict = "below it" if ws["final_loss_ema"] < ws["blind_loss_floor"] else "above it"
        loss_line = (
            f"Final training loss {ws['final_loss_ema']:.4f} nats/token against an image-blind floor of "
            f"{ws['blind_loss_floor']:.4f}: {verdict}."
        )
    looks = (
        "the answers depend on the image"
        if ev["accuracy"] - ev["blank_image_accuracy"] > 0.05
        else "no better without the image: the model is not using it"
    )
    return f"""# cppo demo model: a tiny Qwen2.5-VL warm-started on the shapes task

The default model of `cppo-detect` and `cppo-train` when no model is given
(`cppo.models.demo_model_path()`). It is a real `Qwen2_5_VLForConditionalGeneration` at CPU size,
trained only to answer the shapes task (`cppo.toy`) in the docs/method.md §4 format:
`<think>one sentence naming what it sees</think> \\boxed{{answer}}`. It looks at its image; its
greedy answers are mostly right, its sampled ones less often, so RL has room to improve it. It
knows nothing else.

## Size
- {ws["parameters"]:,} parameters; text: hidden {m["hidden_size"]}, {m["num_layers"]} layers,
  {m["num_heads"]} heads ({m["num_kv_heads"]} KV); vision: hidden {m["vision_hidden_size"]},
  depth {m["vision_depth"]}; images {m["image_size"]} px ({image_tokens} image tokens).
- Tokenizer: `Qwen2Tokenizer`, byte-level BPE learned on the task's text plus Qwen's 14 special tokens;
  official Qwen2.5-VL chat template. Weights stored in bfloat16: {size_mb:.1f} MB.

## Recipe
    {chr(10).join("    " + c if i else c for i, c in enumerate(cmds))}

Supervised, a fresh batch of {r["batch_size"]} generated items every step (describe items: the auxiliary
"name every shape left to right" item); AdamW (betas 0.9/0.98, weight decay {r["weight_decay"]} on
matrices), warmup then cosine to 10 % of the peak, clip 1.0, {threads} on
a 2-core CPU shared with other jobs.
{stage_lines}
{relabel_line}
{loss_line}

## Results: test split (seed {ev["seed"]}, first {ev["n"]} items), greedy decoding
    python -m cppo.models.evaluate --model cppo/assets/demo-model --split test --n {ev["n"]}

| question type | n | accuracy % | sampled avg@K % | format % | reasoning agrees % | chance % |
|---|---|---|---|---|---|---|
{rows}
| **overall** | {ev["n"]} | **{acc:.1f}** | {_pct(ev.get("sampled", {}).get("accuracy"))} | **{fmt:.1f}** | \
{_pct(ev.get("agreement"))} | {100 * ev["chance"]:.1f} |

"Reasoning agrees": the think sentence is the well-formed sentence of its question type and implies
exactly the boxed answer (`cppo.toy.shapes.reasoning_agrees`).
{sampled_line}
With every image replaced by a blank one the accuracy is {100 * ev["blank_image_accuracy"]:.1f} %
({looks}).

CI re-scores the first {sl["n"]} test items (`tests/test_demo_model.py`):
accuracy {100 * sl["accuracy"]:.1f} %, format {100 * sl["format"]:.1f} %, reasoning agrees \
{_pct(sl.get("agreement"))} %; tolerance ±3 points
(bf16 weights on another CPU may flip a near-tied greedy token).

## Limits
{below}Trained on one synthetic task at one image size; one seed. The shapes task's scenes never overlap and
use four exact colours; anything else is out of distribution.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    model_dir = Path(argv[0] if argv else "cppo/assets/demo-model")
    (model_dir / "MODEL_CARD.md").write_text(render_card(model_dir))
    print(f"wrote {model_dir / 'MODEL_CARD.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
