"""Read a benchmark file in VLMEvalKit's TSV format into rows with their images.

The format (open-compass/VLMEvalKit ``vlmeval/dataset/image_base.py``, ``load_data`` and
``dump_image``): a tab-separated table with a header; one row per question. Columns this reader
knows:

- ``index``: the row's id (required, unique);
- ``image``: the picture as base64 (PNG/JPEG bytes), or a Python list literal of base64 strings for
  several pictures, or, to save space, the ``index`` of another row whose picture it reuses (a
  value of 64 characters or fewer is read as such a reference: MathVerse_MINI's five versions of a
  problem share one picture this way);
- ``image_path``: a path (or a list literal of paths) instead of, or beside, ``image``; relative
  paths resolve against the TSV's folder;
- every other column (``question``, ``answer``, options ``A``, ``B``, ..., ``hint``, ``category``,
  ``question_type``, ``answer_type``, ``choices``, ``metadata``, ...) is kept as text; an empty
  cell is ``None``. Which ones a benchmark needs is its own business (``cppo.benchmarks.suite``).

Errors are one line naming the file, the line and the column, and what to do (``TsvError``).
Images are decoded when the file is read, so a broken picture is found before any model runs.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

REFERENCE_MAX_CHARS = 64  # VLMEvalKit: an image cell this short names another row's index


class TsvError(ValueError):
    """A benchmark TSV that cannot be used: one line naming the file, line and column."""


@dataclass
class TsvRow:
    """One question of a benchmark file: its index, its pictures, and every other column as text."""

    index: str
    images: list[Image.Image]
    fields: dict[str, str | None]
    line: int  # the line of the file the row ends on (1 = the header)
    file: str = field(default="")

    @property
    def where(self) -> str:
        """``file:line``, for messages."""
        return f"{self.file}:{self.line}"

    def get(self, column: str, default: str | None = None) -> str | None:
        value = self.fields.get(column)
        return default if value is None else value


def _as_list(cell: str) -> list[str]:
    """VLMEvalKit's ``toliststr``: a Python list literal becomes its items, anything else one item."""
    text = cell.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return [cell]
        if isinstance(items, list):
            return [str(x) for x in items]
    return [cell]


def _decode(b64: str, where: str) -> Image.Image:
    try:
        data = base64.b64decode(b64, validate=False)
        image = Image.open(io.BytesIO(data))
        image.load()
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
        raise TsvError(
            f"{where}: the image cell is not a base64-encoded picture ({type(e).__name__}); "
            "re-export the file or point image_path at the picture"
        ) from None
    return image.convert("RGB")


def _open_path(path_text: str, folder: Path, where: str) -> Image.Image:
    path = Path(path_text)
    path = path if path.is_absolute() else folder / path
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise TsvError(f"{where}: image_path {path} does not exist; fix the path or add the image") from None
    except (UnidentifiedImageError, OSError) as e:
        raise TsvError(f"{where}: image_path {path} is not a readable picture ({e})") from None


def read_tsv(path: str | Path, required: tuple[str, ...] = ("index", "answer")) -> list[TsvRow]:
    """Every row of a VLMEvalKit-format TSV, pictures decoded. ``required``: columns that must exist
    and be non-empty in every row (``index`` always). Raises ``TsvError`` (one line) on bad input."""
    path = Path(path)
    if not path.is_file():
        raise TsvError(
            f"{path}: no such file; give the benchmark's .tsv (VLMEvalKit keeps them in ~/LMUData)"
        )
    csv.field_size_limit(sys.maxsize)  # base64 pictures are far over csv's 128 KiB default
    with open(path, newline="", encoding="utf-8") as f:
        try:
            table = list(_records(csv.reader(f, delimiter="\t")))
        except csv.Error as e:
            raise TsvError(
                f"{path}: not a readable TSV ({e}); VLMEvalKit's files are tab-separated"
            ) from None
        except UnicodeDecodeError:
            raise TsvError(
                f"{path}: not UTF-8 text; is this the .tsv and not an .xlsx or an image?"
            ) from None
    if not table:
        raise TsvError(f"{path}: the file is empty; it needs a header line and one row per question")
    (_, header), body = table[0], table[1:]
    header = [h.strip() for h in header]
    for column in dict.fromkeys(("index", *required)):
        if column not in header:
            raise TsvError(
                f"{path}:1: no column {column!r} in the header (columns: {', '.join(header)}); "
                "is this a VLMEvalKit benchmark file?"
            )
    if "image" not in header and "image_path" not in header:
        raise TsvError(
            f"{path}:1: neither an 'image' nor an 'image_path' column; every question needs its picture"
        )
    if not body:
        raise TsvError(f"{path}: a header but no rows")

    cells: list[tuple[int, dict[str, str | None]]] = []
    for line, record in body:
        if len(record) != len(header):
            raise TsvError(
                f"{path}:{line}: {len(record)} cells for {len(header)} columns; "
                "a tab or newline inside a cell must be quoted"
            )
        cells.append((line, {h: (v if v.strip() else None) for h, v in zip(header, record)}))

    seen: dict[str, int] = {}
    for line, row in cells:
        for column in dict.fromkeys(("index", *required)):
            if row[column] is None:
                raise TsvError(f"{path}:{line}: column {column!r} is empty; every row needs one")
        if row["index"] in seen:
            raise TsvError(
                f"{path}:{line}: index {row['index']} repeats line {seen[row['index']]}; "
                "indices must be unique"
            )
        seen[row["index"]] = line

    pictures = {row["index"]: row.get("image") for _, row in cells}
    rows = []
    for line, row in cells:
        where = f"{path}:{line}"
        images = _row_images(row, pictures, path.parent, where)
        if not images:
            raise TsvError(f"{where}: no picture (empty 'image' and 'image_path'); every question needs one")
        fields = {k: v for k, v in row.items() if k not in ("image", "image_path")}
        rows.append(TsvRow(index=row["index"], images=images, fields=fields, line=line, file=str(path)))
    return rows


def _records(reader) -> Iterator[tuple[int, list[str]]]:
    """(line the record ends on, cells), skipping blank lines."""
    for record in reader:
        if record and any(cell.strip() for cell in record):
            yield reader.line_num, record


def _row_images(row: dict, pictures: dict[str, str | None], folder: Path, where: str) -> list[Image.Image]:
    cell = row.get("image")
    if cell is not None:
        if len(cell) <= REFERENCE_MAX_CHARS:  # another row's index
            target = pictures.get(cell.strip())
            if target is None or len(target) <= REFERENCE_MAX_CHARS:
                raise TsvError(
                    f"{where}: column 'image' holds {cell.strip()!r}, which is neither a picture "
                    "nor the index of a row with one"
                )
            cell = target
        return [_decode(b64, f"{where}: column 'image'") for b64 in _as_list(cell)]
    paths = row.get("image_path")
    if paths is None:
        return []
    return [_open_path(p, folder, f"{where}: column 'image_path'") for p in _as_list(paths)]
