"""cppo-eval: avg@K accuracy and format rate of a model on a dataset, per question type.

    cppo-eval --model runs/cppo/final --data data/shapes --samples 4 --out eval.json
    cppo-eval --data data/shapes --split val --limit 100            # the bundled demo model, greedy
    cppo-eval --model RUN/checkpoints/step-000152 --data hiyouga/geometry3k@test \
              --samples 16 --temperature 1.0 --max-new-tokens 2048   # the paper's avg@16

The data is any source ``cppo-train --data`` takes (cppo.rl.sources: a hub id, JSONL, a parquet file
or dataset folder, a save_to_disk folder, with an optional @split), with the same column mapping and
the same preprocessing (cppo.rl.data; the paper's by default: boxed ground truth, multi-image samples
dropped, small images upscaled, prompts over --max-prompt-length tokens dropped, counted with the
processor's pixel bounds). Prints a short table; ``--out`` writes the report (with every response)
as JSON. See ``cppo.models.evaluate`` (the one evaluator) for the definitions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cppo-eval", description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument(
        "--model", default=None, help="checkpoint folder or hub id (default: the bundled demo model)"
    )
    ap.add_argument(
        "--data",
        required=True,
        help="hub id, JSONL, parquet file or dataset folder, save_to_disk folder; SOURCE@SPLIT names a split",
    )
    ap.add_argument("--split", default="test", help="split when the source names none (default: test)")
    ap.add_argument(
        "--data-columns",
        default=None,
        metavar="FIELD=COLUMN,...",
        help="columns named otherwise, as cppo-train's",
    )
    ap.add_argument("--data-image-root", default=None, help="folder relative image paths resolve against")
    prep = ap.add_argument_group(
        "preprocessing (the paper's by default, as cppo-train's fields of the same names)"
    )
    prep.add_argument(
        "--instruction",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="append the paper's think/boxed instruction to every question (default: on)",
    )
    prep.add_argument("--boxed-answer", action=argparse.BooleanOptionalAction, default=True)
    prep.add_argument("--drop-multi-image", action=argparse.BooleanOptionalAction, default=True)
    prep.add_argument("--min-image-side", type=int, default=28, help="0 = off (default: 28)")
    prep.add_argument(
        "--max-prompt-length",
        type=_int_or_none,
        default=512,
        help="tokens, images included; none = off (default: 512)",
    )
    prep.add_argument("--min-pixels", type=int, default=None, help="default: the model processor's own")
    prep.add_argument("--max-pixels", type=int, default=None, help="default: the model processor's own")
    ap.add_argument("--samples", type=int, default=1, help="K, answers per question (default: 1)")
    ap.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sampling temperature; default: greedy for K=1, 1.0 for K>1",
    )
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="max response tokens (default: 256)")
    ap.add_argument("--batch-size", type=int, default=16, help="responses per generate call (default: 16)")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N questions")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    ap.add_argument(
        "--strict",
        "--data-strict",
        action="store_true",
        help="unusable samples and prompts over --max-prompt-length are errors, not counted skips",
    )
    ap.add_argument("--out", default=None, metavar="FILE.json", help="write the report as JSON")
    return ap


def _int_or_none(text: str) -> int | None:
    return None if text.lower() in ("none", "null") else int(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cppo.models import demo_model_path, load_model_and_processor, load_processor
    from cppo.models.evaluate import evaluate, format_table, resolve_temperature
    from cppo.models.prompt_tokens import set_pixel_bounds
    from cppo.precision import resolve_device, resolve_dtype
    from cppo.prompt import instruction_for
    from cppo.rl.data import DataError, Preprocessing, open_dataset

    try:
        resolve_temperature(args.samples, args.temperature)
        model_path = args.model or str(demo_model_path())
        processor = load_processor(model_path)  # counts the prompts' tokens, then encodes them
        set_pixel_bounds(processor, args.min_pixels, args.max_pixels)
        dataset = open_dataset(
            args.data,
            split=args.split,
            strict=args.strict,
            columns=args.data_columns,
            image_root=args.data_image_root,
            prep=Preprocessing.of(args),
            processor=processor,
        )
        device = resolve_device(args.device)
        dtype = resolve_dtype("auto", device)  # bf16 on CUDA, fp32 on the CPU, as every command
        model, _ = load_model_and_processor(model_path, device=device, dtype=dtype)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"cppo-eval: error: {e}", file=sys.stderr)
        return 2
    print(dataset.summary(), file=sys.stderr)
    t0 = time.time()
    report = evaluate(
        model,
        processor,
        dataset,
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        limit=args.limit,
        instruction=instruction_for(args.instruction),
    )
    report.update(
        model=model_path,
        data=dataset.source,
        seconds=round(time.time() - t0, 1),
        skipped=dict(dataset.skipped),
        dropped=dict(dataset.dropped),
    )
    print(format_table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
