"""JSON Lines (and a ``.json`` file holding one JSON array of objects) read row by row, every failure
naming ``file:line``.

    for where, row in json_rows(Path("data.jsonl")):   # where: "data.jsonl:3"; row: a dict
        ...

A line that is not UTF-8 (a latin-1 byte), not JSON, nested past Python's recursion limit, or not an
object raises JsonRowsError (a ValueError) with the file, the line and what to do; blank lines are
passed over, a UTF-8 byte-order mark at the start is accepted. A ``.json`` file that opens with
``[`` is read as one array (what ``datasets.load_dataset("json")`` also accepts), each object named by
the line it starts on. cppo.rl.sources turns the error into its DataError.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path


class JsonRowsError(ValueError):
    """A JSON Lines file that cannot be read; the message names the file and line."""


def json_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """("file:line", object) of each non-blank line; a ``.json`` file that opens with ``[`` is one
    JSON array of objects instead (what ``datasets.load_dataset("json")`` also reads), each named by
    the line it starts on. Anything else (a line that is not UTF-8, not JSON, nested past Python's
    recursion limit, or not an object) is a JsonRowsError naming the file and line."""
    if path.suffix == ".json" and _first_char(path) == b"[":
        yield from _json_array_rows(path)
        return
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where, bom=lineno == 1)
            if line.strip():
                yield where, _json_object(line, where)[0]


def _first_char(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()[:1]


def _decode(raw: bytes, where: str, bom: bool = False) -> str:
    try:
        return raw.decode("utf-8-sig" if bom else "utf-8")
    except UnicodeDecodeError as e:
        raise JsonRowsError(
            f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line): "
            "save the file as UTF-8"
        ) from None


def _json_object(text: str, where: str, pos: int | None = None) -> tuple[dict, int]:
    """(the JSON object in ``text`` at ``pos``, where it ends); ``pos=None``: the whole text is one."""
    whole = pos is None
    start = _SPACE.match(text, 0).end() if whole else pos
    try:
        row, end = _DECODER.raw_decode(text, start)
        if whole and text[end:].strip():
            raise json.JSONDecodeError("Extra data", text, end)
    except json.JSONDecodeError as e:
        hint = _LINES_EXPECTED if whole and text.lstrip().startswith("[") else ""
        at = where if whole else f"{where.rpartition(':')[0]}:{e.lineno}"  # the file's line, in an array
        raise JsonRowsError(f"{at}: not valid JSON ({e.msg} at column {e.colno}){hint}") from None
    except RecursionError:
        raise JsonRowsError(f"{where}: JSON nested too deeply to read (fix or remove the line)") from None
    if not isinstance(row, dict):
        raise JsonRowsError(f"{where}: expected a JSON object, got {type(row).__name__}{_LINES_EXPECTED}")
    return row, end


_DECODER = json.JSONDecoder()
_LINES_EXPECTED = "; JSON Lines expected (one object per line)"
_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array_rows(path: Path):
    """The objects of a ``.json`` file holding one JSON array, each named by the line it starts on."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise JsonRowsError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}): save the file as UTF-8"
        ) from None
    pos = _SPACE.match(text, text.index("[") + 1).end()
    lineno, counted = 1, 0  # the line of `counted`, the last position counted up to

    def where(at: int) -> str:
        nonlocal lineno, counted
        lineno, counted = lineno + text.count("\n", counted, at), at
        return f"{path}:{lineno}"

    while not text.startswith("]", pos):
        here = where(pos)
        row, end = _json_object(text, here, pos)
        yield here, row
        pos = _SPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            raise JsonRowsError(f"{where(pos)}: not valid JSON (expected ',' or ']' after an item)")
    if text[pos + 1 :].strip():
        raise JsonRowsError(f"{where(pos)}: not valid JSON (more data after the array's closing ']')")
