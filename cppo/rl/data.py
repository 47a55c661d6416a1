"""Training and evaluation data: (images, question, answer) samples, checked up front.

``open_dataset(source)`` reads a source (cppo.rl.sources: a hub id, a JSONL file, a parquet file or
dataset folder, a save_to_disk folder, each with an optional ``@split``), checks every sample and
applies the preprocessing it is given. Departures and choices, each deliberate:

- ``<image>`` placeholders in a question (ViRL39K, Geometry3K, PAPO/MMK12 style) are removed:
  ``cppo.prompt`` puts the image slots before the question, as Qwen2.5-VL's own examples do (the
  official code puts the image where the placeholder was, at the start in both datasets).
- The instruction of docs/method.md §4 is appended by ``cppo.prompt`` to every prompt (the
  ``instruction`` option, on by default), so a question that already ends with it (a dataset
  preprocessed by the official code's scripts) has that copy removed here: the model sees it once.
- Transparent images are composited on white before RGB (as qwen-vl-utils does), not on black.

The paper's preprocessing (``Preprocessing``; the official code's ``examples/data_preprocess/
virl39k.py`` and its dataset's ``filter_overlong_prompts``), each step an option, all on in
``cppo-train`` and ``cppo-eval`` by default:

============================  =====================================================================
ground truth in ``\\boxed{}``   the content of the answer's last box (``boxed_answer``)
multi-image sample            dropped and counted (``drop_multi_image``; off: KEPT with every image,
                              each image with its own views, docs/method.md §5.9)
image side < 28 px            upscaled, aspect kept (LANCZOS), so its shorter side is 28 px
                              (``min_image_side``), when the sample is read
prompt over 512 tokens        dropped and counted, naming the line/row; an error under ``strict``
                              (``max_prompt_length``: chat template, question, instruction and image
                              tokens, counted by cppo.models.prompt_tokens with the processor's pixel
                              bounds ``min_pixels``/``max_pixels``)
============================  =====================================================================

What happens to bad data, case by case (``strict=True`` turns every skip into an error):

============================  =====================================================================
broken JSON / not an object   error naming ``file:line`` (the file itself is damaged; also a line
                              that is not UTF-8 or nests too deeply to read: cppo.rl.jsonl)
missing question or answer    skipped and counted (``file:line`` of the first few in the summary)
question/answer not text      skipped and counted, naming the field: a list, dict, true/false or NaN
                              is never written out as text (a number is: 3 -> "3")
image outside data folder     skipped and counted: a path (``../``, absolute) that leaves the data's
                              folder or ``image_root`` (cppo.rl.sources), unless
                              ``allow_outside_images`` (``--data-allow-outside-images``)
prompt over model positions   skipped and counted: a prompt that leaves no room for a response in the
                              model's ``max_position_embeddings`` (also with max_prompt_length off)
missing image file            skipped and counted
unreadable / corrupt image    skipped and counted (header and ``verify()`` checked up front)
decompression bomb            skipped and counted (Pillow's ``MAX_IMAGE_PIXELS`` is kept, its
                              warning is an error)
aspect ratio > 200            skipped and counted (Qwen2.5-VL's processor rejects it)
text-only sample              KEPT with ``images == []``: the loop skips CPL for it (docs/method.md §5.9)
no usable sample at all       error with the skip counts
============================  =====================================================================

``shapes_data(dir)`` exports the default task (``data: None``) once; ``find_split(path, "val")`` finds a
held-out split beside the training data.

The order in which a run draws the samples is cppo.rl.sampler's. This module is over 300 lines
because the checks of every case in the tables above are one contract: what a sample is, and what
happens to one that is not.

It runs past 300 lines because each preprocessing step and each kind of bad sample (with the
`file:line` it is reported under) belongs to the one loader that counts the skips.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cppo.grading import last_boxed
from cppo.models import demo_model_path, load_processor
from cppo.models.model_dir import ModelError, model_positions
from cppo.models.prompt_tokens import prompt_lengths, set_pixel_bounds
from cppo.perturb import ImageError, image_size_of, load_image, to_rgb
from cppo.prompt import INSTRUCTION, instruction_for
from cppo.rl.config import ConfigError
from cppo.rl.sources import DataError, Rows, find_split, parse_columns, read_source

__all__ = [  # find_split and DataError come from cppo.rl.sources, re-exported for the callers of old
    "DataError",
    "Preprocessing",
    "PromptDataset",
    "Sample",
    "data_processor",
    "find_split",
    "open_config_data",
    "open_dataset",
    "open_image",
    "shapes_data",
    "to_rgb",
    "upscale",
]

MAX_ASPECT_RATIO = 200
_IMAGE_TAG = re.compile(r"\s*<image>\s*")


class _Skip(DataError):
    """A sample-level problem: skipped and counted by ``reason``, or an error under strict."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Preprocessing:
    """The paper's preprocessing (module docstring), step by step; ``Preprocessing()`` is the paper's,
    ``Preprocessing.none()`` changes nothing but the boxed answer (what ``open_dataset`` does unasked)."""

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
    sizes: list = field(default_factory=list)  # (width, height) of each image as the model gets it


def open_image(ref, base: Path | None = None, min_side: int = 0) -> Image.Image:
    """A PIL image from a path, bytes, ``{"bytes", "path"}`` or PIL image, decoded and in RGB by the
    one loader every command uses (``cppo.perturb.load_image``: EXIF orientation, 16-bit scaled,
    bombs refused), and upscaled so that its shorter side is at least ``min_side`` pixels."""
    try:
        return upscale(load_image(ref, base), min_side)
    except ImageError as e:
        raise _skip_for(e) from None


# The loader's reasons, as the counted skips name them.
_SKIP_REASONS = {
    "image not found": "missing image file",
    "cannot read image": "unreadable image",
    "image too large (decompression bomb)": "image too large",
}


def _skip_for(error: ImageError) -> _Skip:
    return _Skip(_SKIP_REASONS.get(error.reason, error.reason), error.detail)


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


class _Dropped(Exception):
    """A sample the preprocessing leaves out on purpose (counted, never an error)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _image_size(ref, base: Path | None, verify: bool) -> tuple[int, int]:
    """Up-front check of one image: it exists, opens (``verify``: decodes), is not a bomb and has an
    aspect ratio Qwen accepts; its (width, height)."""
    try:
        w, h = load_image(ref, base).size if verify else image_size_of(ref, base)
    except ImageError as e:
        raise _skip_for(e) from None
    if max(w, h) > MAX_ASPECT_RATIO * max(1, min(w, h)):
        raise _Skip(f"aspect ratio over {MAX_ASPECT_RATIO}", f"{w}x{h}")
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
    raise _Skip(
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
            raise _Skip(
                "image outside the data folder",
                f"{str(path)!r}: {where}; move the image there, set --data-image-root to a folder "
                "that holds it, or pass --data-allow-outside-images",
            )


def _record(
    row: dict, where: str, rows: Rows, prep: Preprocessing, sizes: bool, verify: bool, outside: bool = False
) -> _Record:
    keys = rows.keys
    qkey, question = _first(row, keys["question"])
    akey, answer = _first(row, keys["answer"])
    ikey, images = _first(row, keys["image"])
    tkey, qtype = _first(row, keys["question_type"])
    question = _text(qkey, question, "question")
    answer = _text(akey, answer, "answer")
    qtype = _text(tkey, qtype, "question_type")
    question = _IMAGE_TAG.sub(" ", question or "").strip()
    if prep.instruction and question.endswith(INSTRUCTION):  # the prompt appends it: keep it once
        question = question[: -len(INSTRUCTION)].strip()
    if not question:
        raise _Skip("missing question", f"no non-empty {' or '.join(keys['question'])}")
    answer = (answer or "").strip()
    if prep.boxed_answer and "\\boxed{" in answer:  # the graders compare with the bare truth
        answer = (last_boxed(answer) or answer).strip()
    if not answer:
        raise _Skip("missing answer", f"no non-empty {' or '.join(keys['answer'])}")
    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    if prep.drop_multi_image and len(images) > 1:
        raise _Dropped("multi-image")
    if (
        rows.hub
        and rows.base is None
        and any(isinstance(r, str) and not Path(r).is_absolute() for r in images)
    ):
        raise DataError(
            f"{where}: image path {images[0]!r} is relative to the dataset's own folder, which a hub id "
            "does not give: download the repository (hf download ID --repo-type dataset --local-dir DIR; "
            "ViRL39K: unzip DIR/images.zip there) and pass --data DIR, or pass --data-image-root DIR"
        )
    _confine(images, rows.base, rows.folder, outside)
    shown = []
    if sizes or verify:
        shown = [upscaled_size(*_image_size(ref, rows.base, verify), prep.min_image_side) for ref in images]
    used = (qkey, akey, ikey, tkey)
    extra = {k: v for k, v in row.items() if k not in used}
    return _Record(question, answer, images, qtype, where, extra, shown)


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


class PromptDataset:
    """Checked and preprocessed samples; images are read from disk when a sample is accessed."""

    def __init__(
        self,
        rows: Rows,
        strict: bool = False,
        verify_images: bool = True,
        prep: Preprocessing | None = None,
        processor=None,
        *,
        max_positions: int | None = None,
        allow_outside_images: bool = False,
    ):
        self.prep = prep = prep or Preprocessing.none()
        if max_positions is None and processor is not None:
            max_positions = processor_positions(processor)
        count = bool(prep.max_prompt_length or max_positions)  # prompt tokens are counted
        if count and processor is None:
            raise ValueError(
                "counting prompt tokens (max_prompt_length, max_positions) needs the model's processor"
            )
        self.source, self.base = rows.label, rows.base
        self.records: list[_Record] = []
        self.skipped: Counter = Counter()  # bad data, by reason
        self.dropped: Counter = Counter()  # left out by the preprocessing, by reason
        self.skip_examples: list[str] = []
        self.drop_examples: list[str] = []
        for where, row in rows.rows:
            try:
                self.records.append(
                    _record(row, where, rows, prep, count, verify_images, allow_outside_images)
                )
            except _Dropped as e:
                self.dropped[e.reason] += 1
            except _Skip as e:
                if strict:
                    raise DataError(f"{where}: {e} (strict data: fix or remove the sample)") from None
                self.skipped[e.reason] += 1
                if len(self.skip_examples) < 5:
                    self.skip_examples.append(f"{where}: {e}")
        if count and self.records:
            self._drop_long_prompts(
                processor, prep.max_prompt_length, max_positions, strict, prep.instruction
            )
        if not self.records:
            reasons = self.summary().removeprefix(f"{self.source}:").lstrip("; ")
            raise DataError(f"{self.source}: no usable sample; {reasons or 'the file holds none'}")
        self.text_only = sum(not r.images for r in self.records)
        self.multi_image = sum(len(r.images) > 1 for r in self.records)

    def _drop_long_prompts(
        self, processor, limit: int | None, positions: int | None, strict: bool, instruction: bool = True
    ) -> None:
        """Leave out the prompts over `limit` tokens, image tokens included (the official code's
        filter_overlong_prompts: a preprocessing drop), and skip those that leave no room for a
        response in the model's `positions` (bad data: the model cannot take them), counting them by
        the pixel bounds the processor has now. Only the text is tokenised: no pixel is encoded."""
        kept = []
        for start in range(0, len(self.records), 512):
            chunk = self.records[start : start + 512]
            questions, sizes = [r.question for r in chunk], [r.sizes for r in chunk]
            with _quiet_transformers():  # its "longer than the maximum" warning: the count is the point
                lengths = prompt_lengths(processor, questions, sizes, instruction_for(instruction))
            for r, n in zip(chunk, lengths):
                if limit and n > limit:
                    prompt = f"{r.source}: prompt of {n} tokens (images included)"
                    message = f"{prompt} is over max_prompt_length {limit}"
                    if strict:
                        raise DataError(
                            f"{message} (strict data: raise max_prompt_length or remove the sample)"
                        )
                    self.dropped[f"prompt over {limit} tokens"] += 1
                    if len(self.drop_examples) < 3:
                        self.drop_examples.append(f"{r.source}: {n} tokens")
                elif positions and n >= positions:
                    problem = (
                        f"prompt of {n} tokens (images included) leaves no room for a response in the "
                        f"model's {positions} positions (max_position_embeddings)"
                    )
                    if strict:
                        raise DataError(f"{r.source}: {problem} (strict data: remove the sample)")
                    self.skipped[f"prompt over the model's {positions} positions"] += 1
                    if len(self.skip_examples) < 5:
                        self.skip_examples.append(f"{r.source}: {problem}")
                else:
                    kept.append(r)
        self.records = kept

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        r = self.records[index]
        try:
            images = [open_image(ref, self.base, self.prep.min_image_side) for ref in r.images]
        except _Skip as e:  # only when verify_images was off, or the file changed since
            raise DataError(f"{r.source}: {e}") from None
        return Sample(index, r.question, r.answer, images, r.question_type, r.source, dict(r.extra))

    @property
    def question_types(self) -> list[str]:
        return sorted({r.question_type for r in self.records if r.question_type is not None})

    def summary(self) -> str:
        """One line for the log: counts of samples, text-only, multi-image, drops and skips with examples."""
        kept = len(self.records)
        text = f"{self.source}: {kept} samples" if kept else f"{self.source}:"
        if kept and (self.text_only or self.multi_image):
            text += f" ({self.text_only} text-only, {self.multi_image} multi-image)"
        if self.dropped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common())
            examples = f" (e.g. {'; '.join(self.drop_examples)})" if self.drop_examples else ""
            text += f"; dropped by the preprocessing {sum(self.dropped.values())}: {reasons}{examples}"
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped.most_common())
            text += (
                f"; skipped {sum(self.skipped.values())}: {reasons} (e.g. {'; '.join(self.skip_examples)})"
            )
        return text


def open_dataset(
    source: str | Path,
    split: str = "train",
    strict: bool = False,
    verify_images: bool = True,
    *,
    columns: str | dict | None = None,
    image_root: str | Path | None = None,
    prep: Preprocessing | None = None,
    processor=None,
    max_positions: int | None = None,
    allow_outside_images: bool = False,
) -> PromptDataset:
    """Read, check and preprocess a source (cppo.rl.sources; ``source@split`` names the split).

    ``columns`` maps sample fields to columns (``"image=images,question=problem"``), ``image_root`` is
    the folder relative image paths resolve against, ``prep`` the preprocessing (None: none but the
    boxed answer) and ``processor`` the model's, which counts prompt tokens for ``max_prompt_length``
    and for ``max_positions`` (None: the positions of the model the processor was loaded from).
    Image paths must lie in the data's folder (or ``image_root``) unless ``allow_outside_images``."""
    if isinstance(columns, str) or columns is None:
        try:
            columns = parse_columns(columns)
        except ValueError as e:
            raise DataError(str(e)) from None
    rows = read_source(source, split, columns, image_root)
    return PromptDataset(
        rows,
        strict,
        verify_images,
        prep,
        processor,
        max_positions=max_positions,
        allow_outside_images=allow_outside_images,
    )


def processor_positions(processor) -> int | None:
    """``max_position_embeddings`` of the model a processor was loaded from (its tokenizer's
    ``name_or_path``), or None for a processor built in memory or a model whose config is not at hand."""
    name = getattr(getattr(processor, "tokenizer", None), "name_or_path", "")
    try:
        return model_positions(name) if name else None
    except ModelError:
        return None


def data_processor(cfg):
    """The run's processor: the model's (``cfg.model``; None = the demo model) with the run's pixel
    bounds, which the data's prompt lengths are counted with and the rollouts encode with."""
    try:  # config, processor files and the weights' headers, before any data is read
        processor = load_processor(cfg.model or demo_model_path(), weights_required=True)
    except ModelError as e:
        raise ConfigError(str(e)) from None
    try:
        set_pixel_bounds(processor, cfg.min_pixels, cfg.max_pixels)
    except ValueError as e:
        raise ConfigError(f"min_pixels/max_pixels: {e}") from None
    return processor


def check_response_room(cfg, processor) -> None:
    """ConfigError when max_new_tokens alone fills the positions of the model the processor was
    loaded from: no prompt could come before such a response."""
    positions = processor_positions(processor)
    if positions is not None and cfg.max_new_tokens >= positions:
        raise ConfigError(
            f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's {positions} "
            "positions (max_position_embeddings): lower it"
        )


def open_config_data(cfg, source, split: str, processor, eval_data: bool = False, verify_images: bool = True):
    """A run's training data (or, ``eval_data``, its held-out data) as the TrainConfig asks: its column
    mapping, image root (training data only), where images may lie, strictness and preprocessing;
    prompts are bounded by the positions of the model the processor was loaded from."""
    columns = (cfg.eval_data_columns or cfg.data_columns) if eval_data else cfg.data_columns
    return open_dataset(
        source,
        split,
        cfg.data_strict,
        verify_images,
        columns=columns,
        image_root=None if eval_data else cfg.data_image_root,
        prep=Preprocessing.of(cfg),
        processor=processor,
        allow_outside_images=cfg.data_allow_outside_images,
    )


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
