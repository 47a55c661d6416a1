"""The per-sample checks and preprocessing of cppo.rl.data's tables, and running them over a source.

``check_row`` takes one raw row to its outcome: kept (the question and answer as the model gets
them, each image's size), dropped by the preprocessing, skipped as bad data, or an error, each with
the reason cppo.rl.data counts it under. ``checked_rows`` runs it over a source:

- a ``datasets`` dataset (hub id, parquet, save_to_disk folder) through ``Dataset.map`` in batches,
  the outcomes written to a cache file named by the dataset's ``_fingerprint`` and the check's
  arguments and code, under ``HF_DATASETS_CACHE/cppo_checks`` (never beside the data: a
  save_to_disk folder may be read-only). A second launch on the same data reads the outcomes
  back instead of opening every image again; a change to the data, the options or this code
  checks again. An image file replaced or removed since is met when the sample is read. The resume
  check (cppo.rl.resume) compares the dataset's own ``_fingerprint`` and the rows kept, not this
  cache's name: a new version of this code checks again but still resumes the run.
- a JSONL file, line by line (the demo path, without ``datasets``).
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from cppo.grading import last_boxed
from cppo.perturb import ImageError, image_size_of, load_image
from cppo.prompt import INSTRUCTION
from cppo.rl.sources import DataError, Source

MAX_ASPECT_RATIO = 200
_IMAGE_TAG = re.compile(r"\s*<image>\s*")
# at or over this many rows, the check runs in several processes (docs/training.md, "Data")
PARALLEL_ROWS = 20_000
_BATCH = 256  # rows per Dataset.map batch


@dataclass(frozen=True)
class Preprocessing:
    """The paper's preprocessing (cppo.rl.data's docstring), step by step; ``Preprocessing()`` is the
    paper's, ``Preprocessing.none()`` changes nothing but the boxed answer (what ``open_dataset``
    does unasked)."""

    boxed_answer: bool = True
    drop_multi_image: bool = True
    min_image_side: int = 28
    max_prompt_length: int | None = 512
    instruction: bool = True  # the prompts append cppo.prompt.INSTRUCTION (counted in their length)

    @classmethod
    def none(cls) -> Preprocessing:
        return cls(drop_multi_image=False, min_image_side=0, max_prompt_length=None)

    @classmethod
    def of(cls, cfg) -> Preprocessing:
        """From a TrainConfig (or cppo-eval's arguments): the fields of the same names."""
        return cls(
            cfg.boxed_answer, cfg.drop_multi_image, cfg.min_image_side, cfg.max_prompt_length, cfg.instruction
        )


class Skip(DataError):
    """A sample-level problem: skipped and counted by ``reason``, or an error under strict."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class _Dropped(Exception):
    """A sample the preprocessing leaves out on purpose (counted, never an error)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# The loader's reasons, as the counted skips name them.
_SKIP_REASONS = {
    "image not found": "missing image file",
    "cannot read image": "unreadable image",
    "image too large (decompression bomb)": "image too large",
}


def _skip_for(error: ImageError) -> Skip:
    return Skip(_SKIP_REASONS.get(error.reason, error.reason), error.detail)


def open_image(ref, base: Path | None = None, min_side: int = 0) -> Image.Image:
    """A PIL image from a path, bytes, ``{"bytes", "path"}`` or PIL image, decoded and in RGB by the
    one loader every command uses (``cppo.perturb.load_image``: EXIF orientation, 16-bit scaled,
    bombs refused), and upscaled so that its shorter side is at least ``min_side`` pixels."""
    try:
        return upscale(load_image(ref, base), min_side)
    except ImageError as e:
        raise _skip_for(e) from None


def upscaled_size(width: int, height: int, min_side: int) -> tuple[int, int]:
    """The size `upscale` gives: scaled by min_side / shorter side when that side is shorter, else as is."""
    if min_side <= 0 or min(width, height) >= min_side:
        return width, height
    scale = min_side / min(width, height)
    return max(min_side, round(width * scale)), max(min_side, round(height * scale))


def upscale(image: Image.Image, min_side: int) -> Image.Image:
    """The image with its shorter side raised to ``min_side`` pixels (aspect kept, LANCZOS), as the
    official code's ViRL39K preprocessing does for sides under 28 px; larger images unchanged."""
    size = upscaled_size(*image.size, min_side)
    return image if size == image.size else image.resize(size, Image.LANCZOS)


def _image_size(ref, base: Path | None, verify: bool) -> tuple[int, int]:
    """Up-front check of one image: it exists, opens (``verify``: decodes), is not a bomb and has an
    aspect ratio Qwen accepts; its (width, height)."""
    try:
        w, h = load_image(ref, base).size if verify else image_size_of(ref, base)
    except ImageError as e:
        raise _skip_for(e) from None
    if max(w, h) > MAX_ASPECT_RATIO * max(1, min(w, h)):
        raise Skip(f"aspect ratio over {MAX_ASPECT_RATIO}", f"{w}x{h}")
    return w, h


def _first(row: dict, keys: tuple[str, ...]):
    for key in keys:
        if row.get(key) is not None:
            return key, row[key]
    return None, None


def _text(key: str | None, value, field: str) -> str | None:
    """A question, answer or question type as text: a string, or a finite number written out (3, 2.5);
    anything else (a list, a dict, true/false, NaN) is refused, never stringified."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    raise Skip(
        f"{field} of the wrong type",
        f"{key} is a {type(value).__name__} ({shown}); it must be a string (or a number)",
    )


def _confine(refs: list, base: Path | None, folder: Path | None, allow: bool) -> None:
    """Every image path of a sample, resolved against ``base``, lies inside ``folder`` (cppo.rl.sources:
    the data's folder or the image root), judged by the written path (``..`` and absolute paths
    resolved; a symlink placed inside the folder is followed as its owner meant); ``allow`` lifts
    the rule (--data-allow-outside-images)."""
    if allow:
        return
    for ref in refs:
        path = ref.get("path") if isinstance(ref, dict) and not ref.get("bytes") else ref
        if not isinstance(path, (str, Path)):
            continue  # bytes, an in-memory image: nothing is opened by name
        full = os.path.abspath(os.path.join(base or "", path))
        root = None if folder is None else os.path.abspath(folder)
        if root is None or os.path.commonpath([root, full]) != root:
            where = "the data has no folder (a hub id)" if root is None else f"it is outside {root}"
            raise Skip(
                "image outside the data folder",
                f"{str(path)!r}: {where}; move the image there, set --data-image-root to a folder "
                "that holds it, or pass --data-allow-outside-images",
            )


def image_refs(row: dict, key: str | None) -> list:
    """The images of a row under ``key`` (a column name, or None: no image column), as a list."""
    images = None if key is None else row.get(key)
    return [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]


def _outcome(status: str, reason=None, message=None, **kept) -> dict:
    return {
        "status": status,
        "reason": reason,
        "message": message,
        "question": None,
        "answer": None,
        "question_type": None,
        "sizes": [],
        "used": [],
        **kept,
    }


def check_row(
    row: dict, source: Source, prep: Preprocessing, sizes: bool, verify: bool, outside: bool = False
) -> dict:
    """The outcome of one raw row (module docstring): ``status`` kept, drop, skip or error, its
    ``reason`` and ``message`` (without the row's place, which the caller adds); kept, the question,
    answer, question type, image sizes as the model gets them (when ``sizes`` or ``verify``) and the
    columns ``used`` for question, answer, images and type (the rest are the sample's extra fields)."""
    try:
        return _check(row, source, prep, sizes, verify, outside)
    except _Dropped as e:
        return _outcome("drop", e.reason)
    except Skip as e:
        return _outcome("skip", e.reason, str(e))
    except DataError as e:  # the data cannot be used at all, not just this sample
        return _outcome("error", None, str(e))


def _check(row: dict, source: Source, prep: Preprocessing, sizes: bool, verify: bool, outside: bool) -> dict:
    keys = source.keys
    qkey, question = _first(row, keys["question"])
    akey, answer = _first(row, keys["answer"])
    ikey, _ = _first(row, keys["image"])
    tkey, qtype = _first(row, keys["question_type"])
    question = _text(qkey, question, "question")
    answer = _text(akey, answer, "answer")
    qtype = _text(tkey, qtype, "question_type")
    question = _IMAGE_TAG.sub(" ", question or "").strip()
    if prep.instruction and question.endswith(INSTRUCTION):  # the prompt appends it: keep it once
        question = question[: -len(INSTRUCTION)].strip()
    if not question:
        raise Skip("missing question", f"no non-empty {' or '.join(keys['question'])}")
    answer = (answer or "").strip()
    if prep.boxed_answer and "\\boxed{" in answer:  # the graders compare with the bare truth
        answer = (last_boxed(answer) or answer).strip()
    if not answer:
        raise Skip("missing answer", f"no non-empty {' or '.join(keys['answer'])}")
    images = image_refs(row, ikey)
    if prep.drop_multi_image and len(images) > 1:
        raise _Dropped("multi-image")
    if (
        source.hub
        and source.base is None
        and any(isinstance(r, str) and not Path(r).is_absolute() for r in images)
    ):
        raise DataError(
            f"image path {images[0]!r} is relative to the dataset's own folder, which a hub id "
            "does not give: download the repository (hf download ID --repo-type dataset --local-dir DIR; "
            "ViRL39K: unzip DIR/images.zip there) and pass --data DIR, or pass --data-image-root DIR"
        )
    _confine(images, source.base, source.folder, outside)
    shown = []
    if sizes or verify:
        shown = [upscaled_size(*_image_size(r, source.base, verify), prep.min_image_side) for r in images]
    return _outcome(
        "kept",
        question=question,
        answer=answer,
        question_type=qtype,
        sizes=[list(s) for s in shown],
        used=[qkey, akey, ikey, tkey],
    )


def _check_batch(batch, source, prep, sizes, verify, outside) -> dict:
    """``Dataset.map``'s function: the outcomes of one batch (an arrow table, images undecoded)."""
    outcomes = [check_row(row, source, prep, sizes, verify, outside) for row in batch.to_pylist()]
    return {name: [o[name] for o in outcomes] for name in _features()}


def _features():
    from datasets import Features, Sequence, Value

    text = Value("string")
    names = ("status", "reason", "message", "question", "answer", "question_type")
    return Features(
        {**{n: text for n in names}, "sizes": Sequence(Sequence(Value("int64"))), "used": Sequence(text)}
    )


def default_procs(n_rows: int) -> int:
    """Processes for the check of ``n_rows`` rows: one under ``PARALLEL_ROWS`` (starting workers costs
    more than it saves there), else up to 8, leaving one core free."""
    return 1 if n_rows < PARALLEL_ROWS else max(1, min(8, (os.cpu_count() or 1) - 1))


def checked_rows(
    source: Source, prep: Preprocessing, sizes: bool, verify: bool, outside: bool, num_proc: int | None = None
):
    """(where, raw row, outcome) for every row of ``source``, in order, and the dataset's
    ``_fingerprint`` (None for a JSONL file). ``num_proc``: processes for a dataset's check (None:
    ``default_procs``)."""
    if source.dataset is None:
        lines = (
            (where, row, check_row(row, source, prep, sizes, verify, outside)) for where, row in source.lines
        )
        return lines, None
    from datasets.fingerprint import Hasher

    ds = source.dataset.with_format("arrow")  # rows as arrow tables: images stay undecoded
    prep = replace(prep, max_prompt_length=None)  # not the check's: cppo.rl.data counts the tokens
    where = (source.keys, str(source.base), str(source.folder), source.hub)
    cached_as = Hasher.hash([ds._fingerprint, where, prep, sizes, verify, outside, _code_hash()])
    kwargs = {"source": Source(source.label, source.base, source.keys, source.hub, source.folder)}
    kwargs.update(prep=prep, sizes=sizes, verify=verify, outside=outside)
    procs = default_procs(len(ds)) if num_proc is None else num_proc
    map_args = dict(
        batched=True,
        batch_size=_BATCH,
        remove_columns=ds.column_names,
        fn_kwargs=kwargs,
        features=_features(),
        new_fingerprint=cached_as,
        num_proc=procs if procs > 1 else None,
        desc=f"checking {source.label}",
    )
    cache = _cache_file(cached_as)
    if cache is None:
        outcomes = ds.map(_check_batch, keep_in_memory=True, **map_args)
    else:
        outcomes = ds.map(_check_batch, cache_file_name=cache, **map_args)

    def in_order():
        raw = ds.iter(batch_size=_BATCH)
        for start, (table, results) in enumerate(zip(raw, outcomes.iter(batch_size=_BATCH))):
            for offset, (row, outcome) in enumerate(zip(table.to_pylist(), results.to_pylist())):
                yield f"{source.label} row {start * _BATCH + offset}", row, outcome

    return in_order(), ds._fingerprint


def _cache_file(fingerprint: str) -> str | None:
    """Where the check's outcomes are cached: ``HF_DATASETS_CACHE/cppo_checks``; None (no cache, the
    check runs every launch, said on stderr) when that folder cannot be written."""
    import datasets

    folder = Path(datasets.config.HF_DATASETS_CACHE) / "cppo_checks"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder} is not writable")
    except OSError as e:
        print(f"[cppo] the data check is not cached ({e}); it runs again every launch", file=sys.stderr)
        return None
    return str(folder / f"check-{fingerprint}.arrow")


_CODE: list[str] = []


def _code_hash() -> str:
    """A hash of the code a row's outcome depends on (this file, the image loader, the boxed-answer
    grader, the instruction): a new version checks again rather than reading an old cache."""
    if not _CODE:
        import hashlib

        import cppo.grading
        import cppo.perturb.load
        import cppo.prompt

        h = hashlib.sha256()
        for module in (sys.modules[__name__], cppo.perturb.load, cppo.grading, cppo.prompt):
            h.update(Path(module.__file__).read_bytes())
        _CODE.append(h.hexdigest()[:16])
    return _CODE[0]
