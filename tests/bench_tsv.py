"""Small benchmark files in VLMEvalKit's TSV format, built in the tests (pictures inline as base64)."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

from PIL import Image


def png_b64(size=(40, 30), color=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: Path, rows: list[dict]) -> Path:
    """A TSV as pandas' ``to_csv(sep='\\t')`` writes it: a header of every key, quoted cells where needed.
    Rows without an ``image`` (nor ``image_path``) get a small inline PNG."""
    rows = [r if ("image" in r or "image_path" in r) else {**r, "image": png_b64()} for r in rows]
    header = list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        for r in rows:
            writer.writerow(["" if r.get(h) is None else r[h] for h in header])
    return path
