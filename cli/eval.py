"""cppo-eval: avg@K accuracy and format rate of a model on a dataset, per question type.

    cppo-eval --model runs/cppo/checkpoints/step-000040 --data data/shapes --samples 4 --out eval.json
    cppo-eval --data data/shapes --split val --limit 100            # the bundled demo model, greedy
    cppo-eval --model RUN/checkpoints/step-000152 --data hiyouga/geometry3k@test \
              --samples 16 --temperature 1.0 --max-new-tokens 2048   # the paper's avg@16
    cppo-eval --protocol paper --model RUN/checkpoints/step-000150 --bench ~/LMUData  # the paper's table

``--bench`` reads VLMEvalKit's benchmark files (cli/eval_bench.py, cppo.benchmarks) instead of ``--data``;
``--protocol paper`` makes the paper's evaluation settings the defaults (cppo.benchmarks.protocol).

The data is any source ``cppo-train --data`` takes (cppo.rl.sources: a hub id, JSONL, a parquet file
or dataset folder, a save_to_disk folder, with an optional @split), with the same column mapping and
the same preprocessing (cppo.rl.data; the paper's by default: boxed ground truth, multi-image samples
dropped, small images upscaled, prompts over --max-prompt-length tokens dropped, counted with the
processor's pixel bounds). Prints a short table; ``--out`` writes the report (with every response)
as JSON. See ``cppo.models.evaluate`` (the one evaluator) for the definitions.

Every flag, the device, the model path and ``--out`` are checked before the processor, the data or
the model is loaded: a bad one is one line on stderr and exit 2, with nothing written. The report is
written to a temporary sibling and renamed over ``--out``, so a failing write (a full disk) leaves
the previous file, or none, and is one line with exit 2 too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

PROG = "cppo-eval"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not the usage block
        print(f"{PROG}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description=__doc__.split("\n")[0], allow_abbrev=False)
    ap.add_argument(
        "--model", default=None, help="checkpoint folder or hub id (default: the bundled demo model)"
    )
    ap.add_argument(
        "--data",
        default=None,
        help="hub id, JSONL, parquet file or dataset folder, save_to_disk folder; SOURCE@SPLIT names a split "
        "(or --bench: benchmark TSV files)",
    )
    ap.add_argument("--split", default="test", help="split when the source names none (default: test)")
    ap.add_argument(
        "--data-columns",
        default=None,
        metavar="FIELD=COLUMN,...",
        help="columns named otherwise, as cppo-train's",
    )
    ap.add_argument("--data-image-root", default=None, help="folder relative image paths resolve against")
    ap.add_argument(
        "--data-allow-outside-images",
        action="store_true",
        help="let image paths point outside the data's folder (or --data-image-root); by default such a "
        "sample is skipped (an error under --strict)",
    )
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
    ap.add_argument(
        "--out",
        default=None,
        metavar="FILE.json",
        help="write the report as JSON (atomically: a failed write leaves the previous file)",
    )
    _add_views_flags(ap)
    _add_paper_flags(ap)
    return ap


# ---------------------------------------------------------------- --views (cppo.detect.views_eval)


def _add_views_flags(ap: argparse.ArgumentParser) -> None:
    views = ap.add_argument_group("perception under views (cppo.detect.views_eval; docs/real-models.md)")
    views.add_argument(
        "--views",
        default=None,
        metavar="PRESET",
        help="also answer under the preset's I+ and I- views and a blank image (a registered preset "
        "or a .yaml): robustness, consistency, reliance, entropy shift (default: off)",
    )
    views.add_argument("--view-draws", type=int, default=2, help="K views of each kind per item (default: 2)")
    views.add_argument("--view-seed", type=int, default=None, help="seed of the views (default: --seed)")


def check_views(args) -> None:
    """--views names a preset that loads and --view-draws is >= 1 (ValueError, one line)."""
    if args.views is None:
        return
    from cppo.perturb import get_preset

    if args.view_draws < 1:
        raise ValueError(f"--view-draws must be >= 1 (views of each kind per item), got {args.view_draws}")
    if args.view_seed is not None and args.view_seed < 0:
        raise ValueError(f"--view-seed must be >= 0, got {args.view_seed}")
    try:
        get_preset(args.views)
    except (KeyError, ValueError) as e:
        raise ValueError(f"--views {args.views}: {e}") from None


def run_views(args, model, processor, dataset, clean: dict) -> dict:
    """The --views report on the items `clean` answered, printed as a table."""
    from cppo.detect.views_eval import evaluate_views, format_views_table
    from cppo.toy import CHANCE

    answering = {**sampling_settings(args), "limit": args.limit}
    t0 = time.time()
    report = evaluate_views(
        model, processor, dataset, args.views, args.view_draws, args.view_seed, chance=CHANCE, clean=clean,
        **answering,
    )  # fmt: skip
    report["seconds"] = round(time.time() - t0, 1)
    for q in clean["questions"]:
        q.pop("response_ids", None)  # only the teacher-forced pass needed them
    print(format_views_table(report))
    return report


# ---------------------------------------------------------------- --protocol, --bench (cppo.benchmarks)


def _add_paper_flags(ap: argparse.ArgumentParser) -> None:
    """The paper's protocol and VLMEvalKit benchmark files (cppo.benchmarks; cli/eval_bench.py runs them)."""
    paper = ap.add_argument_group("the paper's evaluation (cppo.benchmarks)")
    paper.add_argument(
        "--protocol",
        choices=["paper"],
        default=None,
        help="paper: the paper's settings as defaults (min/max pixels 1280*28*28/16384*28*28, 16 samples, "
        "temperature 1.0, top-p 1, 2048 new tokens, no prompt-length filter, multi-image kept, the "
        "instruction, mean and std over runs); flags given explicitly still win",
    )
    paper.add_argument(
        "--bench",
        nargs="+",
        default=None,
        metavar="TSV",
        help="VLMEvalKit benchmark files instead of --data: FILE.tsv (named by its stem, e.g. WeMath.tsv), "
        "NAME=FILE.tsv, or a folder holding them (~/LMUData); prints the paper's table",
    )
    paper.add_argument(
        "--judge",
        default=None,
        metavar="URL",
        help="an OpenAI-compatible endpoint (http://host:port/v1) asked when the local rules cannot match "
        "an answer; key from $OPENAI_API_KEY (default: off, unmatched answers count as wrong)",
    )
    paper.add_argument(
        "--judge-model", default="gpt-4o-mini", help="the judge's model name (default: gpt-4o-mini)"
    )
    paper.add_argument(
        "--boxed-prediction",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="grade the last \\boxed{} of a response, as the paper's evaluation; off: the whole response",
    )


def _int_or_none(text: str) -> int | None:
    return None if text.lower() in ("none", "null") else int(text)


def sampling_settings(args) -> dict:
    """How the answers are sampled, from the flags, for `evaluate` and cli/eval_bench's
    `answer_benchmark` alike (and `evaluate_views`, with a limit)."""
    from cppo.prompt import instruction_for

    return dict(
        samples=args.samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        instruction=instruction_for(args.instruction),
    )


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def check_numbers(args) -> None:
    """Every number cppo-eval takes, before any work; ValueError naming the flag (one line)."""
    problems = []
    for flag, value in (("--samples", args.samples), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            problems.append(f"{flag} must be >= 1, got {value}")
    if args.batch_size < 1:
        problems.append(f"--batch-size must be >= 1 (responses per generate call), got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        problems.append(f"--limit must be >= 1 (leave it out for every question), got {args.limit}")
    t = args.temperature
    if t is not None and not (t >= 0 and math.isfinite(t)):
        problems.append(f"--temperature must be a finite number >= 0 (0 = greedy), got {t}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1] (1 = off), got {args.top_p}")
    if args.seed < 0:
        problems.append(f"--seed must be >= 0, got {args.seed}")
    if args.min_image_side < 0:
        problems.append(f"--min-image-side must be >= 0 (0 = off), got {args.min_image_side}")
    for flag, value in (
        ("--max-prompt-length", args.max_prompt_length),
        ("--min-pixels", args.min_pixels),
        ("--max-pixels", args.max_pixels),
    ):
        if value is not None and value < 1:
            problems.append(f"{flag} must be >= 1, got {value}")
    if args.min_pixels and args.max_pixels and args.min_pixels > args.max_pixels:
        problems.append(f"--min-pixels {args.min_pixels} is over --max-pixels {args.max_pixels}")
    if problems:
        raise ValueError("; ".join(problems))
    if args.samples > 1 and t == 0:
        from cppo.models.evaluate import resolve_temperature

        resolve_temperature(args.samples, t)  # K copies of one greedy answer: its own message


def check_out(out: str | None) -> Path | None:
    """Refuse, before any work, an --out that is empty, a folder, or under a file, or whose folder
    cannot be written (a probe file is made and removed in the nearest existing folder; nothing is
    left, no folder created)."""
    if out is None:
        return None
    if not out.strip():
        raise ValueError("--out is empty: give a file name such as eval.json")
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file name, e.g. {path / 'eval.json'}")
    if path.exists() and not path.is_file():
        raise ValueError(f"--out {out} exists and is not a regular file")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--out {out} cannot be written: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{PROG}-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written ({e.strerror or e}): choose another path") from None
    return path


def write_report(path: Path, report: dict) -> None:
    """The report as JSON, through a temporary sibling renamed over `path` (cppo.rl.atomic): a failed
    write leaves the previous file or none; folders it created for `path` are removed again."""
    from cppo.rl.atomic import atomic_write

    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(report, indent=2) + "\n")
    except OSError:
        for folder in made:  # deepest first
            with suppress(OSError):
                folder.rmdir()
        raise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; under ``--protocol paper`` its settings are the defaults and explicit flags still win."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.protocol == "paper":
        from cppo.benchmarks.protocol import PAPER_SETTINGS

        parser.set_defaults(**PAPER_SETTINGS)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (args.data is None) == (args.bench is None):
        return _fail("give --data (a dataset) or --bench (benchmark TSV files), one of the two")
    if args.bench is not None and args.views is not None:
        return _fail("--views evaluates a --data dataset, not --bench files: drop one of them")
    if args.bench is not None:
        from cli.eval_bench import run

        return run(args)
    from cppo.models import load_model_and_processor, load_processor, model_path_or_demo
    from cppo.models.evaluate import evaluate, format_table
    from cppo.models.prompt_tokens import set_pixel_bounds
    from cppo.precision import check_device, resolve_dtype
    from cppo.rl.checks import Preprocessing
    from cppo.rl.data import open_dataset
    from cppo.rl.sources import DataError, parse_columns

    try:  # everything that needs no model, data or processor, first
        check_numbers(args)
        check_views(args)
        device = check_device(args.device, "cppo-eval")
        out = check_out(args.out)
        try:
            parse_columns(args.data_columns)
        except ValueError as e:
            raise ValueError(f"--data-columns {args.data_columns}: {e}") from None
        model_path = model_path_or_demo(args.model)
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    try:
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
            allow_outside_images=args.data_allow_outside_images,
        )
        dtype = resolve_dtype("auto", device)  # bf16 on CUDA, fp32 on the CPU, as every command
        model, _ = load_model_and_processor(model_path, device=device, dtype=dtype)
    except (DataError, ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    print(dataset.summary(), file=sys.stderr)
    t0 = time.time()
    report = evaluate(
        model,
        processor,
        dataset,
        **sampling_settings(args),
        limit=args.limit,
        token_ids=args.views is not None,
    )
    report.update(
        model=model_path,
        data=dataset.source,
        seconds=round(time.time() - t0, 1),
        skipped=dict(dataset.skipped),
        dropped=dict(dataset.dropped),
    )
    if args.protocol is not None:  # the paper's averaging: run k = every question's k-th answer
        from cppo.benchmarks.protocol import run_summary

        report["over_runs"] = runs = run_summary(report["questions"])
        std = "" if runs["std"] is None else f" ± {runs['std']:.2f}"
        print(f"accuracy over {len(runs['runs'])} runs: {runs['mean']:.2f}{std} %")
    print(format_table(report))
    if args.views is not None:
        report["views"] = run_views(args, model, processor, dataset, report)
    if out is not None:
        existed = out.is_file()
        try:
            write_report(out, report)
        except OSError as e:
            kept = "the previous file is unchanged" if existed else "nothing was written"
            return _fail(
                f"cannot write --out {out} ({e.strerror or e}); {kept}. Free space or choose another --out"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
