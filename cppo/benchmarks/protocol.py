"""The paper's evaluation protocol: its settings, the runs over benchmark files, and the paper's table.

What the official evaluation does (the CPPO authors' VLMEvalKit fork, vbdi/cppo ``eval-VLMEvalKit/``:
``vlmeval/config.py`` for the trained models, ``vlmeval/vlm/qwen2_vl/model.py`` ``Qwen2VLChat_GRPO``,
``postprocess_group_results.py`` and ``create_performance_summary.py``):

- images resized into [1280·28·28, 16384·28·28] pixels; 16 responses per question at temperature
  1.0, top-p 1, no top-k, at most 2,048 new tokens; no prompt-length filter, no item dropped;
- the prompt: the benchmark's own (``cppo.benchmarks.suite``) followed by a space and the think/boxed
  instruction of docs/method.md §4 (``cppo.prompt.INSTRUCTION``); the response is cut to its last
  ``\\boxed{}`` (``cppo.benchmarks.matching.boxed_prediction``) before grading;
- the 16 responses are 16 runs: run k takes every question's k-th response and is scored as a whole
  benchmark (so metrics over groups, WeMath's and DynaMath's worst case, are computed per run); the
  table shows each benchmark's mean over the runs, with the standard deviation over runs (pandas'
  ``std``, n - 1 in the denominator), and the average of the benchmark means.

``PAPER_SETTINGS`` holds those values as ``cppo-eval`` flags; ``cppo-eval --protocol paper`` makes
them the defaults (a flag given explicitly still wins). Departures: the instruction is joined to the
prompt after stripping its trailing whitespace (``cppo.prompt.build_messages``), where the fork keeps
it (a WeMath prompt ends with a newline); generation is ``transformers``' ``generate`` (the fork
used vLLM), so sampled responses differ run to run but not in distribution.

The Instruct baselines were NOT run this way in the fork's config: Qwen2.5-VL-3B-Instruct without
the instruction, at top-p 0.7, one response per question, and the judge reading the whole response
(no boxed cut); Qwen2.5-VL-7B-Instruct without the instruction, at top-p 1, 8 responses, with the
cut. docs/real-models.md gives the ``cppo-eval`` lines for both.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from cppo.benchmarks.judge import ChatJudge
from cppo.benchmarks.matching import boxed_prediction
from cppo.benchmarks.suite import BENCHMARKS, PAPER_BENCHMARKS, Benchmark, get_benchmark
from cppo.benchmarks.tsv import TsvError, TsvRow, read_tsv

MIN_PIXELS = 1280 * 28 * 28  # 1,003,520
MAX_PIXELS = 16384 * 28 * 28  # 12,845,056

# cppo-eval's flags (argparse dests) under --protocol paper
PAPER_SETTINGS: dict[str, object] = {
    "min_pixels": MIN_PIXELS,
    "max_pixels": MAX_PIXELS,
    "samples": 16,
    "temperature": 1.0,
    "top_p": 1.0,
    "max_new_tokens": 2048,
    "max_prompt_length": None,
    "drop_multi_image": False,
    "instruction": True,
    "boxed_prediction": True,
}


def resolve_files(specs: list[str]) -> list[tuple[Benchmark, Path]]:
    """Benchmark files from ``--bench`` arguments: ``NAME=FILE.tsv``, ``FILE.tsv`` (named by its stem, as
    VLMEvalKit names them), or a folder (every paper benchmark whose ``NAME.tsv`` is in it)."""
    found: list[tuple[Benchmark, Path]] = []
    for spec in specs:
        name, sep, path_text = spec.partition("=")
        path = Path(path_text if sep else spec).expanduser()
        if sep:
            found.append((get_benchmark(name), path))
        elif path.is_dir():
            present = [
                (get_benchmark(n), path / f"{n}.tsv")
                for n in PAPER_BENCHMARKS
                if (path / f"{n}.tsv").is_file()
            ]
            if not present:
                raise TsvError(
                    f"--bench {path}: none of {', '.join(f'{n}.tsv' for n in PAPER_BENCHMARKS)} "
                    "is in this folder"
                )
            found += present
        elif path.stem in BENCHMARKS:
            found.append((get_benchmark(path.stem), path))
        else:
            raise TsvError(
                f"--bench {spec}: cannot tell which benchmark {path.name} is; name it as NAME={spec} "
                f"(NAME one of {', '.join(BENCHMARKS.names())})"
            )
    names = [b.name for b, _ in found]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TsvError(f"--bench names {', '.join(repeated)} more than once")
    return found


def load_benchmark(benchmark: Benchmark, path: Path, limit: int | None = None) -> list[TsvRow]:
    """The rows of one benchmark file (the first ``limit``), with every prompt built once to check it."""
    rows = read_tsv(path, required=("index", *benchmark.columns))
    rows = rows[:limit] if limit else rows
    for row in rows:
        benchmark.prompt(row)  # a bad answer_type etc. is found before the model runs
    return rows


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1, as pandas); std None for a single value."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def score_runs(
    benchmark: Benchmark,
    rows: list[TsvRow],
    responses: list[list[str]],
    judge: ChatJudge | None = None,
    boxed: bool = True,
) -> dict:
    """Score K runs of a benchmark. ``responses[i][k]``: question i's k-th response (i < N, k < K).

    Returns ``{"metric", "n", "runs": [K scores], "mean", "std", "parts": {name: mean over runs},
    "verdicts": {"rule"|"judge"|"unresolved": count over N·K predictions}}``; scores in percent."""
    if len(responses) != len(rows) or not rows:
        raise ValueError(f"{len(responses)} response lists for {len(rows)} questions")
    k_runs = len(responses[0])
    runs, parts, verdicts = [], Counter(), Counter()
    for k in range(k_runs):
        hits = []
        for row, answers in zip(rows, responses):
            prediction = boxed_prediction(answers[k]) if boxed else answers[k]
            verdict = benchmark.grade(row, prediction, judge)
            verdicts[verdict.by] += 1
            hits.append(verdict.correct)
        result = benchmark.score(rows, hits)
        runs.append(result["score"])
        parts.update({name: value / k_runs for name, value in result["parts"].items()})
    mean, std = mean_std(runs)
    return {
        "metric": benchmark.metric,
        "n": len(rows),
        "runs": runs,
        "mean": mean,
        "std": std,
        "parts": dict(parts),
        "verdicts": dict(verdicts),
    }


def paper_table(scores: dict[str, dict], samples: int) -> str:
    """The paper's table: one column per benchmark and the average; rows metric, mean, std (percent)."""
    names = list(scores)
    width = max(10, *(len(n) for n in names), *(len(scores[n]["metric"]) for n in names)) + 2
    means = [scores[n]["mean"] for n in names]

    def row(label: str, cells: list[str]) -> str:
        return f"{label:<10}" + "".join(f"{c:>{width}}" for c in cells)

    lines = [
        row("", [*names, "Avg"]),
        row("metric", [scores[n]["metric"] for n in names] + ["mean"]),
        row(f"avg@{samples}", [f"{m:.2f}" for m in means] + [f"{statistics.fmean(means):.2f}"]),
        row("std", [("-" if scores[n]["std"] is None else f"{scores[n]['std']:.2f}") for n in names] + [""]),
    ]
    return "\n".join(lines)


def run_summary(questions: list[dict]) -> dict:
    """For a ``cppo.models.evaluate`` report: run k's accuracy (percent) from every question's k-th grade,
    with the mean and std over runs, the protocol's way of averaging."""
    k_runs = min(len(q["accuracy"]) for q in questions)
    runs = [100.0 * sum(q["accuracy"][k] for q in questions) / len(questions) for k in range(k_runs)]
    mean, std = mean_std(runs)
    return {"runs": runs, "mean": mean, "std": std}


def answer_benchmark(
    model,
    processor,
    benchmark: Benchmark,
    rows: list[TsvRow],
    *,
    samples: int,
    temperature: float | None,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    instruction: str | None,
) -> list[list[str]]:
    """Every question's ``samples`` responses (N lists of K), generated by the one evaluator
    (``cppo.models.evaluate.evaluate``: batching, seeding, left padding) on the benchmark's prompts."""
    from cppo.models.evaluate import EvalItem, evaluate

    items = [
        EvalItem(
            question=benchmark.prompt(row),
            answer=row.get("answer", ""),
            images=row.images,
            source=f"{benchmark.name}:{row.index}",
        )
        for row in rows
    ]
    report = evaluate(
        model,
        processor,
        items,
        samples=samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        instruction=instruction,
    )
    return [q["responses"] for q in report["questions"]]
