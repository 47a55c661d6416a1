"""Training and evaluation data: (images, question, answer) samples, checked up front.

Formats (``open_dataset(path)``):

- JSONL, one object per line: ``image`` (a path) or ``images`` (a list of paths), ``question`` (or
  ``problem``), ``answer``, optional ``question_type``; other keys are kept in ``Sample.extra``.
  Relative image paths are resolved against the JSONL's folder. A folder is read as its
  ``data.jsonl``, or ``<split>/data.jsonl`` (the layout of ``cppo.toy.export_shapes_dataset``).
- A Hugging Face ``datasets`` folder (``save_to_disk``) or a ``.parquet`` file (or a folder of
  ``<split>*.parquet``), with the usual columns ``image``/``images`` (PIL, ``{"bytes", "path"}``,
  bytes or paths), ``question``/``problem`` and ``answer``/``ground_truth``/``solution``. Needs
  ``datasets`` (the ``data`` extra).

Departures and choices, each deliberate:

- An answer written as ``\\boxed{...}`` (ViRL39K, MATH-style solutions) is reduced to the content of
  its last box, since the graders compare the model's boxed content with the bare truth.
- ``<image>`` placeholders in a question (PAPO/MMK12 style) are removed: ``cppo.prompt`` puts the
  image slots before the question, as Qwen2.5-VL's own examples do.
- Transparent images are composited on white before RGB (as qwen-vl-utils does), not on black.

What happens to bad data, case by case (``strict=True`` turns every skip into an error):

============================  =====================================================================
broken JSON / not an object   error naming ``file:line`` (the file itself is damaged)
missing question or answer    skipped and counted (``file:line`` of the first few in the summary)
missing image file            skipped and counted
unreadable / corrupt image    skipped and counted (header and ``verify()`` checked up front)
decompression bomb            skipped and counted (Pillow's ``MAX_IMAGE_PIXELS`` is kept, its
                              warning is an error)
aspect ratio > 200            skipped and counted (Qwen2.5-VL's processor rejects it)
text-only sample              KEPT with ``images == []``: the loop skips CPL for it (docs/method.md §5.9)
multi-image sample            KEPT with every image: each image gets its own views (docs/method.md §5.9)
no usable sample at all       error with the skip counts
============================  =====================================================================

``shapes_data(dir)`` exports the default task (``data: None``) once; ``find_split(path, "val")`` finds a
held-out split beside the training data.

The order in which a run draws the samples is cppo.rl.sampler's. This module is over 300 lines
because the readers of every format and the checks of every case in the table above are one
contract: what a sample is, and what happens to one that is not.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cppo.grading import last_boxed

QUESTION_KEYS = ("question", "problem")
ANSWER_KEYS = ("answer", "ground_truth", "solution")
IMAGE_KEYS = ("images", "image")
MAX_ASPECT_RATIO = 200
_IMAGE_TAG = re.compile(r"\s*<image>\s*")


class DataError(ValueError):
    """Data the trainer cannot use; the message names the file and line or row."""


class _Skip(DataError):
    """A sample-level problem: skipped and counted by ``reason``, or an error under strict."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Sample:
    """One prompt. ``images`` is a list of RGB PIL images, possibly empty (text-only)."""

    index: int
    question: str
    answer: str
    images: list[Image.Image]
    question_type: str | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """What a user reward function receives as ``sample``."""
        return {
            "index": self.index,
            "question": self.question,
            "answer": self.answer,
            "question_type": self.question_type,
            "images": self.images,
            "source": self.source,
            **self.extra,
        }


@dataclass
class _Record:
    question: str
    answer: str
    images: list  # refs: paths, bytes, {"bytes", "path"} dicts or PIL images; loaded on access
    question_type: str | None
    source: str
    extra: dict


def open_image(ref, base: Path | None = None) -> Image.Image:
    """A PIL image from a path, bytes, ``{"bytes", "path"}`` or PIL image, decoded and in RGB."""
    if isinstance(ref, Image.Image):
        image = ref
    else:
        if isinstance(ref, dict):
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, (bytes, bytearray)):
            fp = io.BytesIO(ref)
        elif isinstance(ref, (str, Path)):
            fp = Path(ref) if base is None or Path(ref).is_absolute() else base / ref
            if not fp.is_file():
                raise _Skip("missing image file", str(fp))
        else:
            raise _Skip("unsupported image value", type(ref).__name__)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(fp)
                image.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise _Skip("image too large", str(e)) from None
            except (OSError, SyntaxError, ValueError) as e:
                raise _Skip("unreadable image", f"{fp}: {e}" if isinstance(fp, Path) else str(e)) from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _check_image(ref, base: Path | None) -> None:
    """Up-front check: the image exists, decodes, is not a bomb and has an aspect ratio Qwen accepts."""
    image = open_image(ref, base)
    w, h = image.size
    if max(w, h) > MAX_ASPECT_RATIO * max(1, min(w, h)):
        raise _Skip(f"aspect ratio over {MAX_ASPECT_RATIO}", f"{w}x{h}")


def _first(row: dict, keys: tuple[str, ...]):
    for key in keys:
        if row.get(key) is not None:
            return key, row[key]
    return None, None


def _record(row: dict, source: str, base: Path | None, verify_images: bool) -> _Record:
    qkey, question = _first(row, QUESTION_KEYS)
    akey, answer = _first(row, ANSWER_KEYS)
    ikey, images = _first(row, IMAGE_KEYS)
    question = _IMAGE_TAG.sub(" ", str(question or "")).strip()
    if not question:
        raise _Skip("missing question", f"no non-empty {' or '.join(QUESTION_KEYS)}")
    answer = "" if answer is None else str(answer).strip()
    answer = (last_boxed(answer) or answer).strip() if "\\boxed{" in answer else answer
    if not answer:
        raise _Skip("missing answer", f"no non-empty {' or '.join(ANSWER_KEYS)}")
    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    if verify_images:
        for ref in images:
            _check_image(ref, base)
    qtype = row.get("question_type")
    extra = {k: v for k, v in row.items() if k not in (qkey, akey, ikey, "question_type")}
    return _Record(question, answer, images, None if qtype is None else str(qtype), source, extra)


class PromptDataset:
    """Checked samples; images are read from disk when a sample is accessed."""

    def __init__(self, rows, source: str, base: Path | None, strict: bool, verify_images: bool):
        self.source, self.base = source, base
        self.records: list[_Record] = []
        self.skipped: Counter = Counter()
        self.skip_examples: list[str] = []
        for where, row in rows:
            try:
                self.records.append(_record(row, where, base, verify_images))
            except _Skip as e:
                if strict:
                    raise DataError(f"{where}: {e} (strict data: fix or remove the sample)") from None
                self.skipped[e.reason] += 1
                if len(self.skip_examples) < 5:
                    self.skip_examples.append(f"{where}: {e}")
        if not self.records:
            raise DataError(f"{source}: no usable sample. {self.summary()}")
        self.text_only = sum(not r.images for r in self.records)
        self.multi_image = sum(len(r.images) > 1 for r in self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        r = self.records[index]
        try:
            images = [open_image(ref, self.base) for ref in r.images]
        except _Skip as e:  # only when verify_images was off, or the file changed since
            raise DataError(f"{r.source}: {e}") from None
        return Sample(index, r.question, r.answer, images, r.question_type, r.source, dict(r.extra))

    @property
    def question_types(self) -> list[str]:
        return sorted({r.question_type for r in self.records if r.question_type is not None})

    def summary(self) -> str:
        """One line for the log: counts of samples, text-only, multi-image and skips with examples."""
        kept = len(self.records)
        text = f"{self.source}: {kept} samples" if kept else f"{self.source}:"
        if kept and (self.text_only or self.multi_image):
            text += f" ({self.text_only} text-only, {self.multi_image} multi-image)"
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
            text += (
                f"; skipped {sum(self.skipped.values())}: {reasons} (e.g. {'; '.join(self.skip_examples)})"
            )
        return text


def _jsonl_rows(path: Path):
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{lineno}", row


def _hf_rows(ds, source: str):
    """Rows of a datasets.Dataset without decoding its images (the arrow format keeps bytes/paths)."""
    if not any(k in ds.column_names for k in QUESTION_KEYS) or not any(
        k in ds.column_names for k in ANSWER_KEYS
    ):
        raise DataError(
            f"{source}: needs a {'/'.join(QUESTION_KEYS)} column and an {'/'.join(ANSWER_KEYS)} "
            f"column; it has {', '.join(ds.column_names)}"
        )
    table = ds.with_format("arrow")
    for start in range(0, len(ds), 256):
        for offset, row in enumerate(table[start : start + 256].to_pylist()):
            yield f"{source} row {start + offset}", row


def _load_hf(path: Path, split: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} needs the datasets package: pip install 'cppo[data]'") from None
    if path.suffix == ".parquet" or path.is_dir() and not _is_saved_dataset(path):
        files = [path] if path.is_file() else sorted(path.rglob(f"{split}*.parquet"))
        if not files:
            raise DataError(f"{path}: no {split}*.parquet file in this folder")
        return datasets.Dataset.from_parquet([str(f) for f in files]), (files[0].parent)
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; it has {', '.join(ds)} (pick one with split=...)")
        ds = ds[split]
    return ds, path


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def open_dataset(
    path: str | Path, split: str = "train", strict: bool = False, verify_images: bool = True
) -> PromptDataset:
    """Load and check a dataset in any of the formats of the module docstring."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    jsonl = path if path.is_file() and path.suffix in (".jsonl", ".json") else None
    if path.is_dir():
        jsonl = next((p for p in (path / "data.jsonl", path / split / "data.jsonl") if p.is_file()), None)
    if jsonl is not None:
        return PromptDataset(_jsonl_rows(jsonl), str(jsonl), jsonl.parent, strict, verify_images)
    if path.suffix == ".parquet" or path.is_dir():
        ds, base = _load_hf(path, split)
        return PromptDataset(_hf_rows(ds, str(path)), str(path), base, strict, verify_images)
    raise DataError(f"{path}: not a .jsonl or .parquet file, a dataset folder or a save_to_disk folder")


def find_split(path: str | Path, split: str) -> Path | None:
    """Where ``open_dataset(..., split=split)`` finds ``split`` beside training data at ``path``, or None.

    Covers the folder layouts: ``<dir>/<split>/data.jsonl`` (also when ``path`` is
    ``<dir>/train/data.jsonl``), a DatasetDict folder with that split, ``<dir>/<split>*.parquet``.
    """
    path = Path(path)
    root = path.parent.parent if path.name == "data.jsonl" and path.parent.name != split else path
    if (root / split / "data.jsonl").is_file():
        return root / split / "data.jsonl"
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        return (
            path if split in json.loads((path / "dataset_dict.json").read_text()).get("splits", []) else None
        )
    if path.is_dir() and any(path.rglob(f"{split}*.parquet")):
        return path
    return None


def shapes_data(
    out_dir: str | Path, seed: int = 0, n_train: int = 4000, n_val: int = 200, n_test: int = 400
) -> Path:
    """The default task (``data: None``): the shapes dataset exported into ``out_dir`` (about 10 s for the
    default sizes), or reused when ``out_dir`` already holds one made with the same arguments."""
    from cppo.toy import DEFAULT_IMAGE_SIZE, export_shapes_dataset

    out = Path(out_dir)
    params = {
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "image_size": DEFAULT_IMAGE_SIZE,
    }
    marker = out / "shapes.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == params):
        export_shapes_dataset(out, n_train, n_val, n_test, seed=seed, image_size=DEFAULT_IMAGE_SIZE)
        marker.write_text(json.dumps(params) + "\n")
    return out
