"""`Perturbation`, its registry (`PERTURBATIONS`, a `cppo.registry.Registry`), and the error an
unknown name raises.

A perturbation is a frozen dataclass whose fields are its options (ranges, probabilities), each
documented in `metadata["help"]`. It draws random parameters into a JSON-serialisable dict,
then applies them deterministically (kornia's and albumentations' sample-then-apply split), so a
draw can be recorded, replayed and reproduced from a seed:

    params = p.sample(seed, width, height)   # dict of floats, ints, strings and lists
    out = p.apply(image, params)              # same as p(image, seed)

Subclasses implement `sample`, `apply_numpy` on (H, W, 3) uint8 and `apply_tensor` on
(B, 3, H, W) float32; `apply` handles the image contract around them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from cppo.perturb.image import image_size, to_array, to_batch
from cppo.registry import Registry

KINDS = ("preserving", "removing")


class UnknownNameError(KeyError, ValueError):
    """An unknown perturbation or preset name; the message lists the valid ones."""

    def __init__(self, what: str, name: str, valid):
        self.name = name
        self.valid = sorted(valid)
        super().__init__(f"unknown {what} {name!r}; valid names: {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would print the message quoted
        return self.args[0]


def as_rng(rng_or_seed) -> np.random.Generator:
    """An int seed, a SeedSequence or None -> a new Generator; a Generator is used as is."""
    return np.random.default_rng(rng_or_seed)


@dataclass(frozen=True)
class Perturbation:
    """One view of an image. Fields are options; `params_help` documents the sampled dict."""

    name: str = ""
    kind: str = "preserving"
    params_help: ClassVar[dict[str, str]] = {}

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")

    # --- to implement -------------------------------------------------------------------------
    def sample(self, rng_or_seed, width: int, height: int) -> dict:
        raise NotImplementedError

    def apply_numpy(self, img: np.ndarray, params: dict) -> np.ndarray:  # (H, W, 3) uint8
        raise NotImplementedError

    def apply_tensor(self, x: torch.Tensor, params: dict) -> torch.Tensor:  # (B, 3, H, W) float32
        raise NotImplementedError

    # --- the contract -------------------------------------------------------------------------
    def apply(self, image, params):
        """Apply recorded `params` to a PIL image, an (H, W, C) array or a ([B,] C, H, W) tensor.

        For a (B, C, H, W) tensor, one dict applies to every element; a list of B dicts applies
        one per element (see `sample_batch`).
        """
        if isinstance(image, torch.Tensor):
            x, restore = to_batch(image)  # (B, 3, H, W)
            if isinstance(params, Mapping):
                return restore(self.apply_tensor(x, dict(params)))
            if len(params) != x.shape[0]:
                raise ValueError(f"{self.name}: got {len(params)} param dicts for a batch of {x.shape[0]}")
            return restore(torch.cat([self.apply_tensor(x[i : i + 1], p) for i, p in enumerate(params)]))
        arr, restore = to_array(image)  # (H, W, 3) uint8
        return restore(self.apply_numpy(arr, dict(params)))

    def __call__(self, image, seed):
        """Sample for this image's size and apply: `p(img, s) == p.apply(img, p.sample(s, w, h))`."""
        width, height = image_size(image)
        return self.apply(image, self.sample(seed, width, height))

    def sample_batch(self, rng_or_seed, batch: int, width: int, height: int) -> list[dict]:
        """B independent draws from one generator, for per-element application to a tensor batch."""
        rng = as_rng(rng_or_seed)
        return [self.sample(rng, width, height) for _ in range(batch)]

    # --- description --------------------------------------------------------------------------
    def options(self) -> dict[str, tuple[object, str]]:
        """{option: (value, help)} for every field except name and kind."""
        return {
            f.name: (getattr(self, f.name), f.metadata.get("help", ""))
            for f in dataclasses.fields(self)
            if f.name not in ("name", "kind")
        }

    def with_options(self, **options) -> Perturbation:
        """A copy with some options changed (name and kind included), validated again."""
        return dataclasses.replace(self, **options)

    def summary(self, params: dict) -> str:
        """Short label of a draw for galleries: scalar params with 2 decimals, lists and seeds left out."""
        parts = []
        for k, v in params.items():
            if k.endswith("seed") or isinstance(v, list | dict):
                continue
            parts.append(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}")
        return " ".join(parts)


PERTURBATIONS = Registry("perturbation", error=UnknownNameError)  # name -> Perturbation instance


def register_perturbation(entry=None, *, name: str | None = None, overwrite: bool = False):
    """Register a Perturbation instance, or a subclass (instantiated with its defaults).

    Works as a decorator (`@register_perturbation`) or a call
    (`register_perturbation(Rotate(max_degrees=5), name="rotate5")`); returns its argument.
    """
    if entry is None:
        return lambda e: register_perturbation(e, name=name, overwrite=overwrite)
    inst = entry() if isinstance(entry, type) else entry
    if not isinstance(inst, Perturbation):
        raise TypeError(f"expected a Perturbation subclass or instance, got {type(inst).__name__}")
    if name is not None and name != inst.name:
        inst = inst.with_options(name=name)
    if not inst.name:
        raise ValueError("a perturbation needs a non-empty name")
    PERTURBATIONS.register(inst.name, overwrite=overwrite)(inst)
    return entry


def get_perturbation(name: str) -> Perturbation:
    return PERTURBATIONS.get(name)


def list_perturbations(kind: str | None = None) -> list[str]:
    """Registered names, sorted; `kind` ("preserving" or "removing") filters."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    return [n for n, p in PERTURBATIONS.items() if kind is None or p.kind == kind]
