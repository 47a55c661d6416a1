"""The words around a detection, shared by report.html and the terminal: how to read it, whitespace
drawn visibly, the right/wrong line, the near-zero warning and the summary across examples.

    visible(" 2\\n")                 # '␣2⏎'
    noise_warning(det)              # None, or the sentence saying the selection is noise
    outcome_line(outcome(text, "2"))  # 'truth 2 · model answered 1 · ✗ wrong' (cppo.detect.evidence)
    summary_lines(data_summary(dets))   # plain sentences (cppo.detect.evidence.data_summary)
"""

from __future__ import annotations

import re

NEAR_ZERO_NATS = 0.01  # below this, a shift is what numerical noise and a tiny model's jitter give
WHITESPACE = {" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍"}
RIGHT, WRONG = "✓ right", "✗ wrong"
_SPECIAL = re.compile(r"^<\|[^|<>]+\|>$")  # Qwen's special tokens: <|im_end|>, <|endoftext|>, ...


def how_to_read(selector: str, draws: int) -> str:
    """The one line at the top of the report."""
    views = f"the mean over {draws} removing views" if draws > 1 else "one removing view"
    return (
        f"How to read this: each response token is coloured by its entropy shift dH = H(I-) - H(I) "
        f"({views}, nats). Positive (red) = the token becomes less certain without the image: it "
        "relied on the image. Negative (blue) = the token becomes more certain without the image "
        f"(the model falls back on a default). Outlined = selected ({selector}); underlined = "
        "answer-bearing; ␣ is a space, ⏎ a newline."
    )


def visible(text: str) -> str:
    """`text` with every space, newline and tab drawn as a glyph."""
    return "".join(WHITESPACE.get(c, c) for c in text)


def is_special(text: str) -> bool:
    """A tokenizer special token (``<|im_end|>``), drawn apart from the text."""
    return bool(_SPECIAL.match(text))


def max_selected_shift(det) -> float | None:
    """The largest |dH| among the selected tokens (None when nothing is selected)."""
    shifts = det.shift[det.selected].abs()
    return float(shifts.max()) if len(shifts) else None


def noise_warning(det, threshold: float | None = None) -> str | None:
    """The warning when every selected token's |shift| is below ``threshold`` nats (default
    ``NEAR_ZERO_NATS``), else None. Nothing selected: None (there is no selection to doubt)."""
    threshold = NEAR_ZERO_NATS if threshold is None else threshold
    top = max_selected_shift(det)
    if top is None or top >= threshold:
        return None
    return (
        f"every selected token's shift is below {threshold:g} nats (largest {top:.4f}): the image "
        "barely changes this response; the selection is noise"
    )


def noise_summary(detections) -> str | None:
    """The one-line warning over a run (report banner, stderr), or None when no example is noise."""
    noisy = sum(noise_warning(d) is not None for d in detections)
    if not noisy:
        return None
    return (
        f"in {noisy} of {len(detections)} example(s) every selected token's shift is below "
        f"{NEAR_ZERO_NATS:g} nats: the image barely changes the response; the selection is noise"
    )


def outcome_line(o: dict) -> str:
    """'truth 2 · model answered 1 · ✗ wrong' from ``cppo.detect.evidence.outcome``."""
    answered = "no \\boxed{} answer" if o["answer"] is None else f"model answered {o['answer']}"
    if o["truth"] is None:
        return f"no ground truth given · {answered} · not graded"
    return f"truth {o['truth']} · {answered} · {RIGHT if o['correct'] else WRONG}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def summary_lines(s: dict) -> list[str]:
    """Plain sentences of ``cppo.detect.evidence.data_summary``."""
    lines = []
    if s["graded"]:
        lines.append(
            f"accuracy {s['correct']}/{s['graded']} = {_pct(s['accuracy'])} of the examples with a ground "
            f"truth (cppo.grading, the accuracy reward's rule); format {_pct(s['format'])}"
        )
    else:
        lines.append("accuracy: no example has a ground truth (give --answer, or an answer field)")
    ratio = "" if s["enrichment"] is None else f": {s['enrichment']:.2f}x the base rate"
    lines.append(
        f"answer-bearing tokens: {s['selected_answer_bearing']} of the {s['selected']} selected "
        f"({_pct(s['share'])}) against {s['answer_bearing']} of all {s['tokens']} response tokens "
        f"({_pct(s['base_rate'])}){ratio}"
    )
    return lines
