"""avg@K accuracy and format rate of a model on a dataset, overall and per question type.

Each question is answered K times; its accuracy is the mean of the K grades and avg@K is the mean
of that over questions (so every question weighs the same, whatever K). pass@K (at least one of
the K correct) comes along for free. Grading is the training reward's (``cppo.grading.grade``:
the last ``\\boxed{}`` with math-aware equivalence; format = think tags then a boxed answer), with
the docs/method.md §4 prompt (``cppo.models.encode_prompts``).

Temperature ``None`` means greedy for K = 1 and temperature 1.0 (the rollout temperature) for
K > 1; K > 1 at temperature 0 is refused, since it would average K copies of one greedy answer.
Sampling is seeded per batch, so a run repeats exactly on the same machine.

Used by ``cppo-eval`` and by the trainer's periodic evaluation.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from cppo.grading import grade
from cppo.models import encode_prompts, generate_responses
from cppo.rl.data import PromptDataset


def resolve_temperature(samples: int, temperature: float | None) -> float:
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if temperature is None:
        return 0.0 if samples == 1 else 1.0
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature == 0 and samples > 1:
        raise ValueError(
            f"{samples} samples at temperature 0 are {samples} copies of one greedy answer: "
            "set a temperature > 0, or --samples 1"
        )
    return temperature


def score(questions: list[dict]) -> dict:
    """Aggregate graded questions ``{"question_type", "accuracy": [K], "format": [K]}`` into the report."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for q in questions:
        groups[q.get("question_type") or "all"].append(q)

    def summary(qs: list[dict]) -> dict:
        return {
            "n": len(qs),
            "accuracy": sum(sum(q["accuracy"]) / len(q["accuracy"]) for q in qs) / len(qs),
            "format": sum(sum(q["format"]) / len(q["format"]) for q in qs) / len(qs),
            "pass_at_k": sum(max(q["accuracy"]) for q in qs) / len(qs),
        }

    report = summary(questions)
    if set(groups) != {"all"}:
        report["per_type"] = {t: summary(groups[t]) for t in sorted(groups)}
    return report


@torch.no_grad()
def evaluate(
    model,
    processor,
    dataset: PromptDataset,
    samples: int = 1,
    temperature: float | None = None,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    limit: int | None = None,
) -> dict:
    """Answer each question ``samples`` times and grade; returns ``score``'s report plus ``questions``
    (per question: source, question_type, answer, responses, accuracy and format lists)."""
    temperature = resolve_temperature(samples, temperature)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    per_batch = max(1, batch_size // samples)  # questions per generate call; each repeated K times
    pad = processor.tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    questions = []
    for b, start in enumerate(range(0, n, per_batch)):
        items = [dataset[i] for i in range(start, min(n, start + per_batch))]
        rep = [s for s in items for _ in range(samples)]  # (N = questions x K)
        batch = encode_prompts(processor, [s.question for s in rep], [s.images for s in rep])
        ids, mask = generate_responses(
            model,
            processor,
            batch,
            max_new_tokens=max_new_tokens,
            temperature=temperature or 1.0,
            top_p=top_p,
            do_sample=temperature > 0,
            generator_seed=seed * 100_003 + b,
        )
        texts = processor.batch_decode(ids.masked_fill(~mask.to(ids.device), pad), skip_special_tokens=True)
        for j, s in enumerate(items):
            responses = texts[j * samples : (j + 1) * samples]
            grades = [grade(r, s.answer) for r in responses]
            questions.append(
                {
                    "source": s.source,
                    "question_type": s.question_type,
                    "answer": s.answer,
                    "responses": responses,
                    "accuracy": [a for a, _ in grades],
                    "format": [f for _, f in grades],
                }
            )
    model.train(was_training)
    report = score(questions)
    report.update(
        samples=samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        questions=questions,
    )
    return report


def format_table(report: dict) -> str:
    """A short fixed-width table: one row per question type, then the overall row."""
    k = report.get("samples", 1)
    head = f"{'type':<16} {'n':>5} {f'avg@{k}':>8} {'format':>7} {f'pass@{k}':>7}"
    rows = [head, "-" * len(head)]
    for name, r in [*report.get("per_type", {}).items(), ("overall", report)]:
        rows.append(
            f"{name:<16} {r['n']:>5} {r['accuracy']:>8.3f} {r['format']:>7.3f} {r['pass_at_k']:>7.3f}"
        )
    return "\n".join(rows)
