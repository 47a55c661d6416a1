"""Token classes of shapes-task responses: does the detector pick the tokens that carry what was seen?

    classes = token_classes(det.token_texts, det.example.prompt)   # [(kind, place), ...] per token

Used by ``bench/detect_evidence.py`` (the table in docs/detect.md). Classes come from character
spans of the decoded response, so they hold whatever the tokenizer cuts (a token that overlaps an
answer word is an answer token, e.g. ``{red`` in ``\\boxed{red}``):

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
