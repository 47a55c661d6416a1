"""cppo-detect: which response tokens depend on the image (docs/method.md §2), as a visual report.

    cppo-detect                                                     # bundled demo model and example
    cppo-detect --image shapes.png --prompt "What color is the square?" --answer red
    cppo-detect --image a.png --prompt "..." --response "<think>...</think> \\boxed{2}"
    cppo-detect --model runs/cppo/final --data data/shapes --split test --limit 100 --out runs/detect
    cppo-detect --perturbation occlusion_mean --selector kl_shift --top-percent 0.3

Without --response the response is generated (sampled at --temperature with --seed, or --greedy).
Each example's removing view is drawn --draws times (default 4; 1 is the paper's single view) and
the shift is the mean. Writes into --out: tokens.json, report.html (one self-contained file),
shift_NNNN.png and images/ (original and removing views); see ``cppo.detect.report``. Prints the
example's top tokens (one example), the accuracy and the share of answer-bearing tokens among the
selected ones, and one warning line on stderr when an example's selected shifts are all near zero.
Every input is checked before any work: bad input prints one line naming what is wrong and exits 2.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

PROG = "cppo-detect"


def bundled_example_path() -> Path:
    """The no-argument example: one shapes item (cppo/assets/detect-example/data.jsonl)."""
    import cppo

    return Path(cppo.__file__).resolve().parent / "assets" / "detect-example" / "data.jsonl"


def build_parser() -> argparse.ArgumentParser:
    from cppo.loss.select import SELECTORS

    ap = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--model", default=None, help="checkpoint folder or hub id (default: the bundled demo model)"
    )
    ap.add_argument("--image", action="append", default=None, help="image file; repeat for several images")
    ap.add_argument("--prompt", default=None, help="the question asked about the image(s)")
    ap.add_argument("--response", default=None, help="response text to score (default: generate one)")
    ap.add_argument(
        "--answer", default=None, help="ground truth of --image/--prompt: the report grades the boxed answer"
    )
    ap.add_argument(
        "--data",
        default=None,
        help="many examples: a JSONL file or dataset folder "
        "(cppo.rl.data formats; an optional 'response' or 'response_ids' field is scored as given)",
    )
    ap.add_argument("--split", default="test", help="split of a dataset folder")
    ap.add_argument("--limit", type=int, default=None, help="only the first N examples of --data")
    ap.add_argument(
        "--strict", action="store_true", help="with --data: unusable samples are errors, not skips"
    )
    ap.add_argument(
        "--data-allow-outside-images",
        action="store_true",
        help="with --data: let image paths point outside the data's folder; by default such a sample is "
        "skipped, never opened (an error under --strict)",
    )
    ap.add_argument("--preset", default="paper", help="preset whose removing views are drawn (name or .yaml)")
    ap.add_argument("--perturbation", default=None, help="one removing perturbation instead of the preset's")
    ap.add_argument("--seed", type=int, default=0, help="seeds the views and generated responses")
    ap.add_argument(
        "--draws",
        type=int,
        default=4,
        help="K removing views per example (mean shift and spread); 1 is the paper's single view",
    )
    ap.add_argument("--top-percent", type=float, default=0.5, help="rho: fraction of candidates selected")
    ap.add_argument(
        "--selector",
        default="raw",
        choices=SELECTORS.names(),
        help="ranking rule (default raw: on the demo model the paper's relative ranks near-certain format "
        "tokens first; docs/detect.md)",
    )
    ap.add_argument("--temperature", type=float, default=1.0, help="divides the logits; sampling temperature")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="length cap of generated responses")
    ap.add_argument("--greedy", action="store_true", help="generate greedily instead of sampling")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per model pass")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 on CPU",
    )
    ap.add_argument("--out", default="runs/detect", help="output folder")
    ap.add_argument("--max-report", type=int, default=50, help="examples with plots/images in the report")
    return ap


def _fail(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def _read_image(path: str):
    from cppo.perturb import load_image

    return load_image(path)  # ImageError (a ValueError): one line naming the file


def _check_numbers(args) -> None:
    """Every number the detector takes, checked before any work (ValueError, one line)."""
    problems = []
    if args.draws < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        problems.append("--draws, --batch-size and --max-new-tokens must be >= 1")
    if not 0 < args.top_percent <= 1:
        problems.append(f"--top-percent must be in (0, 1], got {args.top_percent}")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        problems.append(f"--temperature must be a number > 0, got {args.temperature}")
    if args.seed < 0:
        problems.append(f"--seed must be >= 0, got {args.seed}")
    if args.max_report < 0:
        problems.append(f"--max-report must be >= 0 (0: no plots or images), got {args.max_report}")
    if args.limit is not None and args.limit < 1:
        problems.append(f"--limit must be >= 1, got {args.limit}")
    if not args.out.strip():
        problems.append("--out is empty: give an output folder")
    if problems:
        raise ValueError("; ".join(problems))


def _check_out(out: Path) -> None:
    """Refuse, before the model loads, an --out that is a file or cannot be written."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=".cppo-detect-probe-", dir=out.parent)).rmdir()
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written: {e.strerror or e}") from None


def _write(detections, out: Path, settings: dict, max_report: int) -> dict:
    """write_outputs into a temporary sibling, then rename its entries into `out`: a failed write
    (full disk, read-only) leaves `out` as it was. OSError carries the reason."""
    from cppo.detect.report import write_outputs

    tmp = Path(tempfile.mkdtemp(prefix=".cppo-detect-", dir=out.parent))
    try:
        write_outputs(detections, tmp, settings, max_examples=max_report)
        out.mkdir(exist_ok=True)
        for entry in tmp.iterdir():
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"report": out / "report.html"}


def _examples(args) -> tuple[list, str]:
    """(examples, where they came from); raises ValueError/DataError with a one-line message."""
    from cppo.detect.detection import Example
    from cppo.rl.data import open_dataset

    single = any(x is not None for x in (args.image, args.prompt, args.response, args.answer))
    if args.data and single:
        raise ValueError(
            "give either --data (its rows carry the answer) or --image/--prompt/--response/--answer, not both"
        )
    if single:
        if not args.image:
            raise ValueError("--prompt needs --image (the detector removes information from an image)")
        if args.prompt is None:
            raise ValueError("--image needs --prompt (the question asked about it)")
        if not args.prompt.strip():
            raise ValueError("the prompt is empty")
        if args.response is not None and not args.response.strip():
            raise ValueError("the response is empty (leave --response out to generate one)")
        if args.answer is not None and not args.answer.strip():
            raise ValueError("--answer is empty (leave it out when the truth is not known)")
        images = [_read_image(p) for p in args.image]
        extra = {} if args.answer is None else {"answer": args.answer.strip()}
        return [
            Example(images, args.prompt, args.response, name=", ".join(args.image), extra=extra)
        ], "--image"
    path = args.data or str(bundled_example_path())
    dataset = open_dataset(
        path, split=args.split, strict=args.strict, allow_outside_images=args.data_allow_outside_images
    )
    n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    examples, text_only = [], 0
    for i in range(n):
        s = dataset[i]
        if not s.images:
            text_only += 1
            continue
        resp = s.extra.get("response_ids", s.extra.get("response"))
        extra = {"answer": s.answer, **({"question_type": s.question_type} if s.question_type else {})}
        examples.append(Example(s.images, s.question, resp, name=s.source, extra=extra))
    if args.data:
        skipped = f"; {text_only} text-only skipped (nothing to remove)" if text_only else ""
        print(dataset.summary() + skipped, file=sys.stderr)
    if not examples:
        raise ValueError(f"{path}: no example with an image")
    return examples, path if args.data else "bundled example"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cppo.detect import explain
    from cppo.detect.detection import DetectError
    from cppo.detect.detector import PerceptionDetector
    from cppo.detect.evidence import data_summary
    from cppo.detect.report import terminal_summary
    from cppo.models import load_model_and_processor, model_path_or_demo
    from cppo.perturb import UnknownNameError, get_perturbation, get_preset
    from cppo.precision import check_device, resolve_dtype
    from cppo.rl.sources import DataError

    try:  # everything that needs no model, first
        _check_numbers(args)
        device = check_device(args.device, "cppo-detect")
        get_preset(args.preset)
        if args.perturbation is not None:
            get_perturbation(args.perturbation)
        examples, source = _examples(args)
        model_path = model_path_or_demo(args.model)
        out = Path(args.out)
        _check_out(out)
    except (ValueError, DataError, FileNotFoundError, UnknownNameError, OSError) as e:
        return _fail(str(e))

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar; ours is over examples
    t0 = time.time()
    try:
        model, processor = load_model_and_processor(
            model_path, device=device, dtype=resolve_dtype(args.dtype, device)
        )
        detector = PerceptionDetector(
            model,
            processor,
            preset=args.preset,
            perturbation=args.perturbation,
            selector=args.selector,
            top_percent=args.top_percent,
            draws=args.draws,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            greedy=args.greedy,
            batch_size=args.batch_size,
            seed=args.seed,
            compute_kl=args.data is not None,  # so the summary compares kl_shift as well
        )
        detections = detector.detect(examples)
    except (DetectError, DataError, FileNotFoundError, UnknownNameError) as e:
        return _fail(str(e))
    except (RuntimeError, ValueError, OSError) as e:  # device strings, CUDA absent, unloadable checkpoints
        return _fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    settings = {"model": model_path, "source": source, **detector.describe()}
    try:
        files = _write(detections, out, settings, args.max_report)
    except OSError as e:
        return _fail(f"cannot write {out}: {e.strerror or e} (nothing was changed there)")
    if len(detections) == 1:
        print(terminal_summary(detections[0]))
    for line in explain.summary_lines(data_summary(detections)):
        print(f"{PROG}: {line}")
    if warning := explain.noise_summary(detections):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    n_sel = sum(int(d.selected.sum()) for d in detections)
    n_tok = sum(int(d.response_mask.sum()) for d in detections)
    print(
        f"{PROG}: {len(detections)} example(s), {n_sel} of {n_tok} response tokens selected "
        f"({args.selector}, {detector.preset.name if args.perturbation is None else args.perturbation}, "
        f"{args.draws} draw(s)) "
        f"in {time.time() - t0:.1f} s"
    )
    print(f"{PROG}: report: {files['report']}  (tokens.json, shift plots and images/ in {out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
