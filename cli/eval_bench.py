"""``cppo-eval --bench``: benchmark TSV files in, the paper's table out (cppo.benchmarks).

    cppo-eval --protocol paper --model RUN/checkpoints/step-000150 --bench ~/LMUData --out paper.json
    cppo-eval --protocol paper --bench WeMath=data/wemath.tsv --judge http://localhost:8000/v1 --limit 50

Called by ``cli.eval.main`` when ``--bench`` is given. Every flag, the device, ``--out``, the benchmark
files (read and their pictures decoded) and the judge (one request) are checked before the model is
loaded: a bad one is one line on stderr and exit 2, with nothing written.
"""

from __future__ import annotations

import sys
import time

from cli.eval import _fail, check_numbers, check_out, sampling_settings, write_report


def run(args) -> int:
    from cppo.benchmarks import ChatJudge, JudgeError, TsvError, paper_table, resolve_files, score_runs
    from cppo.benchmarks.protocol import answer_benchmark, load_benchmark
    from cppo.models import load_model_and_processor, load_processor, model_path_or_demo
    from cppo.models.prompt_tokens import set_pixel_bounds
    from cppo.precision import check_device, resolve_dtype

    try:  # everything that needs no model, first
        check_numbers(args)
        device = check_device(args.device, "cppo-eval")
        out = check_out(args.out)
        files = resolve_files(args.bench)
        judge = ChatJudge(args.judge, model=args.judge_model) if args.judge else None
        model_path = model_path_or_demo(args.model)
        loaded = [(bench, path, load_benchmark(bench, path, args.limit)) for bench, path in files]
        if judge is not None:
            judge.check()
    except (ValueError, FileNotFoundError, JudgeError) as e:  # TsvError is a ValueError
        return _fail(str(e))
    try:
        processor = load_processor(model_path)
        set_pixel_bounds(processor, args.min_pixels, args.max_pixels)
        model, _ = load_model_and_processor(model_path, device=device, dtype=resolve_dtype("auto", device))
    except (ValueError, FileNotFoundError) as e:
        return _fail(str(e))
    for bench, path, rows in loaded:
        print(f"{bench.name}: {len(rows)} questions from {path}", file=sys.stderr)

    t0 = time.time()
    scores, answered = {}, {}
    for bench, _, rows in loaded:
        responses = answer_benchmark(model, processor, bench, rows, **sampling_settings(args))
        try:
            scores[bench.name] = score_runs(bench, rows, responses, judge, boxed=args.boxed_prediction)
        except TsvError as e:  # a metric that needs columns or groups the file lacks
            return _fail(str(e))
        answered[bench.name] = [{"index": r.index, "responses": rs} for r, rs in zip(rows, responses)]
    print(paper_table(scores, args.samples))
    if judge is not None:
        print(
            f"judge {judge.model} at {judge.url}: {judge.calls} calls, {judge.failures} unanswered",
            file=sys.stderr,
        )

    if out is not None:
        report = {
            "model": model_path,
            "protocol": args.protocol,
            "settings": {
                k: getattr(args, k)
                for k in (
                    "samples",
                    "temperature",
                    "top_p",
                    "max_new_tokens",
                    "min_pixels",
                    "max_pixels",
                    "instruction",
                    "boxed_prediction",
                    "seed",
                )
            },
            "judge": None
            if judge is None
            else {"url": judge.url, "model": judge.model, "calls": judge.calls, "failures": judge.failures},
            "seconds": round(time.time() - t0, 1),
            "benchmarks": {name: {**s, "questions": answered[name]} for name, s in scores.items()},
        }
        existed = out.is_file()
        try:
            write_report(out, report)
        except OSError as e:
            kept = "the previous file is unchanged" if existed else "nothing was written"
            return _fail(
                f"cannot write --out {out} ({e.strerror or e}); {kept}. Free space or choose another --out"
            )
    return 0
