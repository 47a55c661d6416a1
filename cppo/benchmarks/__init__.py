"""The paper's evaluation: VLMEvalKit-format benchmark files, each benchmark's metric, a pluggable judge.

    cppo-eval --protocol paper --model RUN/checkpoints/step-000150 --bench ~/LMUData --out paper.json

Files: ``tsv`` (read a VLMEvalKit TSV, pictures inline as base64 or by path), ``matching`` (the
boxed cut and the option rules), ``suite`` (the seven benchmarks: prompt, grading, metric; a
registry by VLMEvalKit's dataset name; DynaMath's prompt and parsing in ``dynamath``),
``metrics`` (one run's score from per-question verdicts:
accuracy, WeMath's strict score, DynaMath's average and worst case, MathVerse's overall),
``judge`` (any OpenAI-compatible chat endpoint, off unless ``--judge URL``), ``protocol`` (the
paper's settings, K runs scored as K benchmarks, mean and std, the paper's table).

docs/real-models.md (Evaluation) has the commands and how far the local rules agree with the judge.
"""

from cppo.benchmarks.judge import ChatJudge, JudgeError
from cppo.benchmarks.matching import Verdict
from cppo.benchmarks.protocol import PAPER_SETTINGS, paper_table, resolve_files, score_runs
from cppo.benchmarks.suite import BENCHMARKS, PAPER_BENCHMARKS, Benchmark, get_benchmark
from cppo.benchmarks.tsv import TsvError, TsvRow, read_tsv

__all__ = [
    "BENCHMARKS",
    "PAPER_BENCHMARKS",
    "PAPER_SETTINGS",
    "Benchmark",
    "ChatJudge",
    "JudgeError",
    "TsvError",
    "TsvRow",
    "Verdict",
    "get_benchmark",
    "paper_table",
    "read_tsv",
    "resolve_files",
    "score_runs",
]
