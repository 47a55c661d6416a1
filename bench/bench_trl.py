"""TRL side by side: our loop (`cppo-train`) against TRL's GRPOTrainer and TRL + CPPOTrainer.

    python bench/bench_trl.py                                  # 8 prompts x 5, 64 new tokens, CPU
    python bench/bench_trl.py --prompts 2 --group 2 --max-new-tokens 8 --steps 2 --repeats 1 --in-process

Every variant trains the bundled demo model on the same exported shapes prompts with the same
settings (below), one optimizer update per step from micro-batches of `--micro` rows, for `--steps`
steps; the variants run in turn, repeat after repeat (interleaved), each in a fresh process so its
peak memory is its own. Reported per variant: the median seconds per step over every step but each
run's first (warm-up), the peak resident set of a step (the same /proc measure `cppo-train` logs
as memory/peak_mb: the process's VmHWM, reset at each step's start) and the mean response length
(a step's cost follows it, and sampling differs between the frameworks).

Made equal: model (fp32, CPU), prompts per step, group size, max new tokens, sampling (temperature
1, top-p 1, top-k off), lr (constant, no warm-up), AdamW weight decay 0.01, grad clip 1.0, beta 0.01
(k3 to a frozen reference), PPO clip 0.2, token-mean loss per micro-batch (TRL `loss_type="bnpo"`),
one update per step, micro-batch size, no gradient checkpointing, the CPL settings (lambda 0.01,
tau 0.1, rho 0.5, relative selector, A > 0 gate, k3, paper preset). `SETTINGS_NOT_EQUAL` lists what
could not be made equal. Writes a markdown table (and `--json`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("ours-grpo", "ours-cppo", "trl-grpo", "trl-cppo")
LABELS = {
    "ours-grpo": "our loop, GRPO",
    "ours-cppo": "our loop, CPPO",
    "trl-grpo": "TRL GRPOTrainer",
    "trl-cppo": "TRL + CPPOTrainer",
}
SETTINGS_NOT_EQUAL = [
    "the prompts of a step: each framework shuffles the same prompt set with its own sampler",
    "the sampled responses (different RNG use), hence their lengths: see the length column",
    "advantages: std + 1e-6 (ours) vs std + 1e-4 (TRL)",
    "dual clip: ours offers it, TRL does not; it is off here (--dual_clip none)",
    "rewards: ours accuracy (math-verify) + format, 0.9/0.1; TRL a regex exact match of the last "
    "\\boxed{} + the same format regex, 0.9/0.1 (grading is well under 1 % of a step)",
    "image processing: TRL processes each row's image (G times per prompt) twice per step (tokenising "
    "for generation, then for the forward kwargs); ours encodes each prompt's image once",
    "the vision tower: ours encodes a micro-batch's repeated image once per pass and shares it across "
    "the group's rows (cppo.response_stats); TRL runs it for every row, in every pass (CPPOTrainer's view "
    "passes go through TRL's own scoring, so they do too)",
    "the entropy and log-prob head: ours chunked in float32 (cppo.response_stats), TRL its fused LM head",
]


# ---- peak resident set, as cppo-train measures it (Linux /proc) ----
def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# ---- the variants ----
def export_data(out: Path, n: int) -> Path:
    from cppo.toy.shapes import export_shapes_dataset

    return export_shapes_dataset(out, n_train=n, n_val=1, n_test=1)["train"]


def run_ours(args, algo: str, data: Path, out: Path) -> dict:
    argv = [
        "--algo", algo, "--data", str(data), "--output_dir", str(out), "--device", "cpu",
        "--dtype", "float32", "--max_steps", str(args.steps), "--prompts_per_step", str(args.prompts),
        "--group_size", str(args.group), "--max_new_tokens", str(args.max_new_tokens),
        "--micro_batch_size", str(args.micro), "--lr", str(args.lr), "--warmup_steps", "0",
        "--lr_schedule", "constant", "--weight_decay", "0.01", "--grad_clip", "1.0", "--beta", "0.01",
        "--clip_low", "0.2", "--clip_high", "0.2", "--dual_clip", "none", "--loss_agg", "token-mean",
        "--temperature", "1.0", "--top_p", "1.0", "--top_k", "0", "--no_gradient_checkpointing",
        "--cpl_lambda", "0.01", "--seed", str(args.seed), "--eval_every", "0", "--log_rollouts", "0",
        "--no_tensorboard", "--no_freeze_vision",  # TRL trains every parameter too
    ]  # fmt: skip
    if args.in_process:
        from cli.train import main

        assert main(argv) == 0
    else:
        code = "import sys; from cli.train import main; sys.exit(main(sys.argv[1:]))"
        subprocess.run([sys.executable, "-c", code, *argv], check=True, cwd=ROOT, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "time/step" in r]
    length = [r.get("response/length", r.get("response/length_mean")) for r in rows]
    return {
        "times": [r["time/step"] for r in rows],
        "peaks": [r.get("memory/peak_mb") for r in rows],
        "lengths": [x for x in length if x is not None],
    }


def _rewards():
    import re

    pattern = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.S)

    def accuracy(completions, answer, **kwargs):
        boxed = [re.findall(r"\\boxed\{([^}]*)\}", c[0]["content"]) for c in completions]
        return [float(bool(b) and b[-1].strip() == a) for b, a in zip(boxed, answer)]

    def format_ok(completions, **kwargs):
        return [float(bool(pattern.fullmatch(c[0]["content"]))) for c in completions]

    return [accuracy, format_ok]


def run_trl(args, cppo: bool, data: Path, out: Path) -> dict:
    import warnings

    import torch
    from datasets import Dataset
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from cppo.integrations.trl import CPPOConfig, CPPOTrainer
    from cppo.models import ImageOnlyQwen2_5_VLProcessor, demo_model_path
    from cppo.prompt import build_messages

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list(
        [
            {
                "prompt": build_messages(r["question"]),
                "image": Image.open(data.parent / r["image"]).convert("RGB"),
                "answer": r["answer"],
            }
            for r in rows
        ]
    )
    n = args.prompts * args.group
    if n % args.micro:
        raise SystemExit(f"--micro ({args.micro}) must divide prompts x group ({n}) for TRL")
    common = dict(
        output_dir=str(out), max_steps=args.steps, num_generations=args.group,
        per_device_train_batch_size=args.micro, gradient_accumulation_steps=n // args.micro,
        steps_per_generation=n // args.micro, max_completion_length=args.max_new_tokens,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
        max_grad_norm=1.0, beta=0.01, epsilon=0.2, loss_type="bnpo", temperature=1.0, top_p=1.0,
        top_k=0, reward_weights=[0.9, 0.1], gradient_checkpointing=False, use_cpu=True, bf16=False,
        report_to=[], save_strategy="no", logging_steps=1, seed=args.seed,
    )  # fmt: skip
    config = CPPOConfig(**common, cpl_lambda=0.01) if cppo else GRPOConfig(**common)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times, self.peaks = [], []

        def on_train_begin(self, *a, **k):
            reset_peak()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t)
            self.peaks.append(peak_mb())
            reset_peak()
            self.t = time.perf_counter()

    clock = StepClock()
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(demo_model_path(), dtype=torch.float32)
    processor = ImageOnlyQwen2_5_VLProcessor.from_pretrained(demo_model_path(), padding_side="left")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = CPPOTrainer if cppo else GRPOTrainer
        trainer = cls(
            model=model, reward_funcs=_rewards(), args=config, train_dataset=dataset,
            processing_class=processor, callbacks=[clock],
        )  # fmt: skip
        trainer.train()
    key = "completions/mean_length"
    lengths = [h[key] for h in trainer.state.log_history if key in h]
    return {"times": clock.times, "peaks": clock.peaks, "lengths": lengths}


def run_variant(args, variant: str, data: Path, out: Path) -> dict:
    if variant.startswith("ours"):
        return run_ours(args, variant.split("-")[1], data, out)
    if args.in_process:
        return run_trl(args, variant == "trl-cppo", data, out)
    cmd = [sys.executable, __file__, "--worker", variant, "--data", str(data), "--out", str(out)]
    for k in ("prompts", "group", "max_new_tokens", "micro", "steps", "lr", "seed"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    res = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---- the report ----
def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for v, rs in runs.items():
        times = [t for r in rs for t in r["times"][1:]] or [t for r in rs for t in r["times"]]
        peaks = [p for r in rs for p in r["peaks"][1:] if p is not None] or [
            p for r in rs for p in r["peaks"] if p is not None
        ]
        lengths = [x for r in rs for x in r["lengths"]]
        out[v] = {
            "s_per_step": statistics.median(times),
            "steps_timed": len(times),
            "peak_mb": max(peaks) if peaks else None,
            "mean_length": statistics.fmean(lengths) if lengths else None,
        }
    return out


def table(summary: dict[str, dict]) -> str:
    base = summary.get("ours-grpo")
    lines = [
        "| variant | s/step (median) | × our GRPO | peak RSS MB | × our GRPO | mean response tokens |",
        "|---|---|---|---|---|---|",
    ]
    for v, s in summary.items():
        ratio_t = f"{s['s_per_step'] / base['s_per_step']:.2f}" if base else "–"
        peak = f"{s['peak_mb']:.0f}" if s["peak_mb"] else "–"
        both = base and s["peak_mb"] and base["peak_mb"]
        ratio_m = f"{s['peak_mb'] / base['peak_mb']:.2f}" if both else "–"
        length = f"{s['mean_length']:.1f}" if s["mean_length"] is not None else "–"
        lines.append(f"| {LABELS[v]} | {s['s_per_step']:.2f} | {ratio_t} | {peak} | {ratio_m} | {length} |")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro", type=int, default=4, help="rows per forward/backward")
    p.add_argument("--steps", type=int, default=4, help="steps per run (the first is not timed)")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant, interleaved")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--in-process", action="store_true", help="no subprocesses (smoke tests; peaks shared)")
    p.add_argument("--json", default=None, help="write the runs and the summary here")
    p.add_argument("--worker", choices=("trl-grpo", "trl-cppo"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.worker:  # one TRL run in this fresh process; its result is the last stdout line
        res = run_trl(args, args.worker == "trl-cppo", Path(args.data), Path(args.out))
        print(json.dumps(res))
        return res
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        data = export_data(Path(tmp) / "data", args.prompts * args.steps)
        for rep in range(args.repeats):
            for v in args.variants:  # interleaved: every variant once per repeat
                t0 = time.perf_counter()
                runs[v].append(run_variant(args, v, data, Path(tmp) / f"{v}-{rep}"))
                print(f"[{rep + 1}/{args.repeats}] {v}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    summary = summarise(runs)
    print(f"{args.prompts} prompts x {args.group}, {args.max_new_tokens} new tokens, micro-batch "
          f"{args.micro}, {args.steps} steps x {args.repeats} runs per variant (first step untimed), "
          f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}\n")  # fmt: skip
    print(table(summary))
    print("\nNot made equal:\n" + "\n".join(f"- {s}" for s in SETTINGS_NOT_EQUAL))
    result = {"settings": vars(args), "runs": runs, "summary": summary, "not_equal": SETTINGS_NOT_EQUAL}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
