"""What a detection means against the answer: answer-bearing tokens, grading, the selectors compared.

    bearing = answer_bearing(det.token_texts, truth="2")        # [bool] per token
    outcome(det.response_text, truth="2")                      # {"truth", "answer", "correct", "format"}
    data_summary(detections)                                   # accuracy, shares, per selector
    classes = token_classes(det.token_texts, det.example.prompt)   # shapes-task classes (bench)

    python -m cppo.detect.evidence --model DIR --out runs/detect-selectors   # the per-selector table

**Answer-bearing tokens** (task-agnostic; the report's summary and ``main`` use them): the tokens
that overlap the content of the response's last ``\\boxed{...}`` (to the end of the text if
unclosed), and, anywhere else in the response, the tokens that overlap a whole-word,
case-insensitive occurrence of the boxed content or of the ground truth when one is known (the
reasoning that spells the answer: ``2`` in "I see 2 yellow shapes" before ``\\boxed{2}``). Token
overlap is by character spans of the decoded response, so ``{red`` in ``\\boxed{red}`` counts.

Grading is the project's (``cppo.grading.grade``, the ``accuracy`` reward's rule), never a new one.

``token_classes`` is the finer, shapes-specific classing behind ``bench/detect_evidence.py`` (the
per-perturbation tables in docs/detect.md):
- kind ``visual``: overlaps an answer-bearing word (a colour name, a digit, ``yes``/``no``) that
  does not occur in the question: that content can only have come from the image.
- kind ``echoed``: overlaps an answer-bearing word that the question already contains (``red`` in
  "I see 2 red shapes" after "How many red shapes are there?"). Reported apart from ``visual``:
  an echoed word can shift almost as much without being read from the pixels
  (docs/detect.md, the evidence section). In ``further_left`` answers both colours are
  echoed, though their order is the visual decision.
- kind ``format``: overlaps ``<think>``, ``</think>`` or ``\\boxed`` and no answer word.
- kind ``other``: everything else (prose, punctuation, the end token).
- place ``boxed`` when the token overlaps the content of the response's last ``\\boxed{...}``
  (``{red`` does), else ``outside``.
"""

from __future__ import annotations

import re
from itertools import accumulate

from cppo.grading import format_ok, grade, last_boxed
from cppo.toy import COLORS

ANSWER_WORDS = frozenset(COLORS) | {"yes", "no"}
FORMAT_MARKERS = ("</think>", "<think>", "\\boxed")
KINDS = ("visual", "echoed", "format", "other")
_WORD = re.compile(r"[A-Za-z]+|\d")  # Qwen's pre-tokenizer splits digits one by one


def _boxed_content(text: str) -> tuple[int, int] | None:
    """[start, end) of the content of the last \\boxed{...} (to the end of the text if unclosed)."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return None
    start, depth = i + len("\\boxed{"), 1
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return start, j
    return start, len(text)


def token_classes(token_texts: list[str], question: str) -> list[tuple[str, str]]:
    """(kind, place) of every token; see the module docstring."""
    text = "".join(token_texts)
    asked = {w.lower() for w in _WORD.findall(question)}
    answer_spans = [
        (m.start(), m.end(), "echoed" if m.group().lower() in asked else "visual")
        for m in _WORD.finditer(text)
        if m.group().lower() in ANSWER_WORDS or m.group().isdigit()
    ]
    format_spans = []
    for marker in FORMAT_MARKERS:
        format_spans += [(m.start(), m.end()) for m in re.finditer(re.escape(marker), text)]
    boxed = _boxed_content(text)
    out, pos = [], 0
    for tok in token_texts:
        s, e = pos, pos + len(tok)
        pos = e
        kind = next((k for a, b, k in answer_spans if s < b and e > a), None)
        if kind is None:
            kind = "format" if any(s < b and e > a for a, b in format_spans) else "other"
        place = "boxed" if boxed is not None and s < boxed[1] and e > boxed[0] else "outside"
        out.append((kind, place))
    return out


# ------------------------------------------------------------------ answer-bearing tokens, grading

_EDGE = "A-Za-z0-9"


def truth_of(det) -> str | None:
    """The ground truth carried by a detection's example (``extra["answer"]``), or None."""
    answer = (det.example.extra or {}).get("answer")
    answer = "" if answer is None else str(answer).strip()
    return answer or None


def _token_spans(token_texts: list[str]) -> list[tuple[int, int]]:
    ends = list(accumulate(len(t) for t in token_texts))
    return [(e - len(t), e) for t, e in zip(token_texts, ends)]


def _word_occurrences(text: str, word: str) -> list[tuple[int, int]]:
    """[start, end) of every whole-word, case-insensitive occurrence of `word` in `text`."""
    pattern = rf"(?<![{_EDGE}]){re.escape(word)}(?![{_EDGE}])"
    return [(m.start(), m.end()) for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


def answer_bearing(token_texts: list[str], truth: str | None = None) -> list[bool]:
    """Per token: does it carry the answer? (the module docstring's definition)."""
    text = "".join(token_texts)
    spans = []
    boxed = _boxed_content(text)
    words = {truth.strip()} if truth and truth.strip() else set()
    if boxed is not None:
        spans.append(boxed)
        words.add(text[boxed[0] : boxed[1]].strip())
    for word in sorted(w for w in words if w):
        spans += _word_occurrences(text, word)
    return [any(s < b and e > a for a, b in spans) for s, e in _token_spans(token_texts)]


def bearing_of(det) -> list[bool]:
    """``answer_bearing`` of a detection against its own truth; masked positions are not response tokens."""
    flags = answer_bearing(det.token_texts, truth_of(det))
    return [b and bool(m) for b, m in zip(flags, det.response_mask.tolist())]


def outcome(response: str, truth: str | None) -> dict:
    """{"truth", "answer" (last box or None), "correct" (None without a truth), "format"}."""
    correct = None if truth is None else grade(response, truth)[0] == 1.0
    return {"truth": truth, "answer": last_boxed(response), "correct": correct, "format": format_ok(response)}


# ------------------------------------------------------------------ across examples


def _share(k: int, n: int) -> float | None:
    return k / n if n else None


def selector_shares(detections, bearing: list[list[bool]], top_percent: float) -> dict[str, dict]:
    """Per registered selector (from the same statistics, at rho = ``top_percent``): how many tokens
    it selects over all examples, how many of them are answer-bearing, the share and its ratio to
    the base rate. ``kl_shift`` is left out when the detections carry no KL."""
    from cppo.loss.select import SELECTORS

    n_tok = sum(int(d.response_mask.sum()) for d in detections)
    n_bear = sum(sum(b) for b in bearing)
    base = _share(n_bear, n_tok)
    out = {}
    for name in SELECTORS.names():
        if name == "kl_shift" and any(d.kl is None for d in detections):
            continue
        picked = hits = 0
        for d, flags in zip(detections, bearing):
            _, sel = d.select(name, top_percent)  # (T,)
            idx = sel.nonzero().flatten().tolist()
            picked += len(idx)
            hits += sum(flags[t] for t in idx)
        share = _share(hits, picked)
        out[name] = {
            "selected": picked,
            "answer_bearing": hits,
            "share": share,
            "enrichment": None if share is None or not base else share / base,
        }
    return out


def data_summary(detections) -> dict:
    """Across examples: accuracy (examples with a truth), format rate, and the share of answer-bearing
    tokens among the selected ones against their base rate among all response tokens, for the
    detections' own selection and (``selectors``) every registered selector at the same rho."""
    truths = [truth_of(d) for d in detections]
    outcomes = [outcome(d.response_text, t) for d, t in zip(detections, truths)]
    bearing = [bearing_of(d) for d in detections]
    graded = [o["correct"] for o in outcomes if o["correct"] is not None]
    n_tok = sum(int(d.response_mask.sum()) for d in detections)
    n_bear = sum(sum(b) for b in bearing)
    n_sel = sum(int(d.selected.sum()) for d in detections)
    n_sel_bear = sum(
        sum(b[t] for t in d.selected.nonzero().flatten().tolist()) for d, b in zip(detections, bearing)
    )
    base, share = _share(n_bear, n_tok), _share(n_sel_bear, n_sel)
    top_percent = detections[0].top_percent if detections else 0.5
    return {
        "examples": len(detections),
        "graded": len(graded),
        "correct": sum(graded),
        "accuracy": _share(sum(graded), len(graded)),
        "format": _share(sum(o["format"] for o in outcomes), len(outcomes)),
        "tokens": n_tok,
        "answer_bearing": n_bear,
        "base_rate": base,
        "selector": detections[0].selector if detections else None,
        "top_percent": top_percent,
        "selected": n_sel,
        "selected_answer_bearing": n_sel_bear,
        "share": share,
        "enrichment": None if share is None or not base else share / base,
        "selectors": selector_shares(detections, bearing, top_percent),
    }


# ------------------------------------------------------------------ python -m cppo.detect.evidence


def selectors_markdown(summary: dict, settings: dict) -> str:
    """The per-selector table of ``main`` (and of docs/detect.md) as markdown."""
    s = summary
    acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.1%}"
    lines = [
        f"Model `{settings['model']}`, {s['examples']} shapes test items, one response each "
        f"({'greedy' if settings['greedy'] else 'sampled at temperature ' + str(settings['temperature'])}; "
        f"accuracy {acc}), {s['tokens']} response tokens of which {s['answer_bearing']} answer-bearing "
        f"(base rate {s['base_rate']:.1%}); preset `{settings['preset']}`, {settings['draws']} draw(s), "
        f"seed {settings['seed']}, rho {s['top_percent']}.",
        "",
        "| selector | selected | answer-bearing | share | × base rate |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in s["selectors"].items():
        share = "-" if r["share"] is None else f"{r['share']:.1%}"
        enr = "-" if r["enrichment"] is None else f"{r['enrichment']:.2f}"
        lines.append(f"| `{name}` | {r['selected']} | {r['answer_bearing']} | {share} | {enr} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Re-measure the per-selector shares on the shapes test split; writes selectors.{json,md}."""
    import argparse
    import json
    import sys
    from pathlib import Path

    from cppo.detect.detection import DetectError, Example
    from cppo.detect.detector import PerceptionDetector
    from cppo.models import demo_model_path
    from cppo.toy import split_items

    ap = argparse.ArgumentParser(
        prog="python -m cppo.detect.evidence",
        description="Share of answer-bearing tokens each selector picks, on the shapes test split.",
    )
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled demo model)")
    ap.add_argument("--n", type=int, default=400, help="test items (the first n of the split, seed 0)")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--draws", type=int, default=4, help="K removing views per item (cppo-detect's default)")
    ap.add_argument("--top-percent", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/detect-selectors")
    args = ap.parse_args(argv)
    if args.n < 1:
        print(f"{ap.prog}: error: --n must be >= 1, got {args.n}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar; the detector's runs over items
    model_path = args.model or str(demo_model_path())
    items = split_items("test", args.n, seed=0)
    examples = [
        Example([it.image], it.question, name=f"test:{i}", extra={"answer": it.answer})
        for i, it in enumerate(items)
    ]
    try:
        detector = PerceptionDetector.from_pretrained(
            model_path,
            preset=args.preset,
            draws=args.draws,
            top_percent=args.top_percent,
            temperature=args.temperature,
            greedy=args.greedy,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            compute_kl=True,  # so kl_shift is compared too
        )
        detections = detector.detect(examples)
    except (DetectError, OSError) as e:
        print(f"{ap.prog}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    summary = data_summary(detections)
    settings = {"model": model_path, "n": args.n, **detector.describe()}
    text = selectors_markdown(summary, settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selectors.json").write_text(json.dumps({"settings": settings, **summary}, indent=1) + "\n")
    (out / "selectors.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
