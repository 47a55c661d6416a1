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

The checks and the preprocessing of one sample are cppo.rl.checks' (``check_row``): for a
``datasets`` source they run through ``Dataset.map`` and are cached by the dataset's fingerprint, so
a second launch on the same data does not check again; ``fingerprint`` is then the dataset's
``_fingerprint`` with the rows kept (what a resume compares, cppo.rl.resume). This module counts the
outcomes, drops the prompts that are too long (their tokens are counted with the model's processor)
and reads the images of a sample when it is accessed.
The order in which a run draws the samples is cppo.rl.sampler's.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from cppo.rl.checks import Preprocessing, Skip, checked_rows, image_refs, open_image
from cppo.rl.prompt_count import processor_positions, prompt_token_counts
from cppo.rl.sources import DataError, Source, parse_columns, read_source

__all__ = ["PromptDataset", "Sample", "open_config_data", "open_dataset", "shapes_data"]


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


class PromptDataset:
    """Checked and preprocessed samples; images are read from disk when a sample is accessed."""

    def __init__(
        self,
        source: Source,
        strict: bool = False,
        verify_images: bool = True,
        prep: Preprocessing | None = None,
        processor=None,
        *,
        max_positions: int | None = None,
        allow_outside_images: bool = False,
        num_proc: int | None = None,
    ):
        self.prep = prep = prep or Preprocessing.none()
        if max_positions is None and processor is not None:
            max_positions = processor_positions(processor)
        count = bool(prep.max_prompt_length or max_positions)  # prompt tokens are counted
        if count and processor is None:
            raise ValueError(
                "counting prompt tokens (max_prompt_length, max_positions) needs the model's processor"
            )
        self.source, self.base = source.label, source.base
        self.records: list[_Record] = []
        self.skipped: Counter = Counter()  # bad data, by reason
        self.dropped: Counter = Counter()  # left out by the preprocessing, by reason
        self.skip_examples: list[str] = []
        self.drop_examples: list[str] = []
        outcomes, fingerprint = checked_rows(
            source, prep, count, verify_images, allow_outside_images, num_proc
        )
        for where, row, outcome in outcomes:
            self._count(where, row, outcome, strict)
        if count and self.records:
            self._drop_long_prompts(
                processor, prep.max_prompt_length, max_positions, strict, prep.instruction
            )
        if not self.records:
            reasons = self.summary().removeprefix(f"{self.source}:").lstrip("; ")
            raise DataError(f"{self.source}: no usable sample; {reasons or 'the file holds none'}")
        self.text_only = sum(not r.images for r in self.records)
        self.multi_image = sum(len(r.images) > 1 for r in self.records)
        # the dataset's _fingerprint and the rows kept, by number: "LABEL row i" without the label,
        # which names the data's path (a copied save_to_disk folder resumes). None for a JSONL file
        kept = [r.source.removeprefix(self.source) for r in self.records]
        self.fingerprint = None if fingerprint is None else _hash([fingerprint, kept])

    def _count(self, where: str, row: dict, outcome: dict, strict: bool) -> None:
        """One row's outcome (cppo.rl.checks.check_row): a record, or a counted drop or skip."""
        status, reason = outcome["status"], outcome["reason"]
        if status == "error":
            raise DataError(f"{where}: {outcome['message']}")
        if status == "drop":
            self.dropped[reason] += 1
        elif status == "skip":
            if strict:
                raise DataError(f"{where}: {outcome['message']} (strict data: fix or remove the sample)")
            self.skipped[reason] += 1
            if len(self.skip_examples) < 5:
                self.skip_examples.append(f"{where}: {outcome['message']}")
        else:
            used = outcome["used"]
            images = image_refs(row, used[2])
            extra = {k: v for k, v in row.items() if k not in used}
            sizes = [tuple(s) for s in outcome["sizes"]]
            self.records.append(
                _Record(
                    outcome["question"],
                    outcome["answer"],
                    images,
                    outcome["question_type"],
                    where,
                    extra,
                    sizes,
                )
            )

    def _drop_long_prompts(
        self, processor, limit: int | None, positions: int | None, strict: bool, instruction: bool = True
    ) -> None:
        """Leave out the prompts over `limit` tokens, image tokens included (the official code's
        filter_overlong_prompts: a preprocessing drop), and skip those that leave no room for a
        response in the model's `positions` (bad data: the model cannot take them), counting them by
        the pixel bounds the processor has now. Only the text is tokenised: no pixel is encoded."""
        kept = []
        for r, n in zip(self.records, prompt_token_counts(processor, self.records, instruction)):
            if limit and n > limit:
                prompt = f"{r.source}: prompt of {n} tokens (images included)"
                message = f"{prompt} is over max_prompt_length {limit}"
                if strict:
                    raise DataError(f"{message} (strict data: raise max_prompt_length or remove the sample)")
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
        except Skip as e:  # only when verify_images was off, or the file changed since
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
    num_proc: int | None = None,
) -> PromptDataset:
    """Read, check and preprocess a source (cppo.rl.sources; ``source@split`` names the split).

    ``columns`` maps sample fields to columns (``"image=images,question=problem"``), ``image_root`` is
    the folder relative image paths resolve against, ``prep`` the preprocessing (None: none but the
    boxed answer) and ``processor`` the model's, which counts prompt tokens for ``max_prompt_length``
    and for ``max_positions`` (None: the positions of the model the processor was loaded from).
    Image paths must lie in the data's folder (or ``image_root``) unless ``allow_outside_images``.
    ``num_proc``: processes checking a ``datasets`` source (None: cppo.rl.checks.default_procs)."""
    if isinstance(columns, str) or columns is None:
        try:
            columns = parse_columns(columns)
        except ValueError as e:
            raise DataError(str(e)) from None
    return PromptDataset(
        read_source(source, split, columns, image_root),
        strict,
        verify_images,
        prep,
        processor,
        max_positions=max_positions,
        allow_outside_images=allow_outside_images,
        num_proc=num_proc,
    )


def _hash(value) -> str:
    from datasets.fingerprint import Hasher

    return Hasher.hash(value)


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
