"""Shared test helpers: tiny models, shapes batches and datasets, the bundled demo model.

    from tests.helpers import tiny_model_and_processor, shapes_items, shapes_batch, shapes_dataset

Builders are cached per process; `tiny_model_and_processor()` hands out a fresh copy of the model
each call, so a test may train or modify it without touching other tests.
"""

from __future__ import annotations

import copy
import errno
import functools
import os
from pathlib import Path

import numpy as np

from cppo.models import (
    TinyVLMConfig,
    build_tiny_model,
    demo_model_path,
    encode_prompts,
    load_model_and_processor,
)
from cppo.toy import ShapesItem, export_shapes_dataset, make_item

REPO = Path(__file__).resolve().parents[1]


def repo_pythonpath() -> str:
    """PYTHONPATH for a test's subprocess: the repository first, then the caller's own entries (so
    that scripts/test_floor.sh's transformers reaches the workers too)."""
    inherited = os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(REPO), *([inherited] if inherited else [])])


@functools.lru_cache(maxsize=4)
def _tiny(seed: int, config_items: tuple):
    return build_tiny_model(TinyVLMConfig(**dict(config_items)), seed=seed)


def tiny_model_and_processor(seed: int = 0, **config):
    """(model, processor): a randomly initialised tiny Qwen2.5-VL (fresh copy, eval mode, float32)."""
    model, processor = _tiny(seed, tuple(sorted(config.items())))
    return copy.deepcopy(model), processor


@functools.lru_cache(maxsize=1)
def _demo():
    return load_model_and_processor(demo_model_path())


def demo_model_and_processor():
    """(model, processor) of the bundled warm-started checkpoint (fresh copy of the model, float32)."""
    model, processor = _demo()
    return copy.deepcopy(model), processor


def shapes_items(n: int, seed: int = 0, question_type: str | None = None) -> list[ShapesItem]:
    """n shapes items (112 px) from a fixed seed."""
    rng = np.random.default_rng(seed)
    return [make_item(rng, question_type=question_type) for _ in range(n)]


def shapes_batch(processor, n: int = 4, seed: int = 0) -> tuple[list[ShapesItem], dict]:
    """(items, left-padded prompt batch with one image each) for n shapes items."""
    items = shapes_items(n, seed)
    return items, encode_prompts(processor, [it.question for it in items], [[it.image] for it in items])


def shapes_dataset(tmp_path: Path, n: int = 8, seed: int = 0) -> dict[str, Path]:
    """An exported shapes dataset under tmp_path with n items per split: {split: data.jsonl path}."""
    return export_shapes_dataset(Path(tmp_path) / "shapes", n_train=n, n_val=n, n_test=n, seed=seed)


class FillsUp:
    """A file whose write puts half its bytes on disk, then fails as a full disk does."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)
