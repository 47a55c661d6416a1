"""Information-removing fills: random-box occlusion (noise, mean colour, background colour),
PAPO's grid patch blackening, and the full mean-grey image.

Written by hand: albumentations' `CoarseDropout`/`GridDropout` and kornia's `RandomErasing`
draw their fills from their own generators (so a recorded draw would not replay identically on
both backends) and have no independent per-cell blackening on a fixed pixel grid. What remains
is pasting a fill into boxes, a few lines per backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from cppo.perturb.base import Perturbation, as_rng, register_perturbation

FILLS = ("noise", "mean", "background")


def _pixel_boxes(boxes, w: int, h: int) -> list[tuple[int, int, int, int]]:
    """Relative [x, y, bw, bh] -> pixel (x0, y0, pw, ph), at least 1 px, inside the image."""
    out = []
    for x, y, bw, bh in boxes:
        pw, ph = max(1, round(bw * w)), max(1, round(bh * h))
        out.append((min(int(x * w), w - pw), min(int(y * h), h - ph), pw, ph))
    return out


def _noise_patches(seed: int, pboxes) -> list[np.ndarray]:
    """One (ph, pw, 3) uint8 uniform-noise patch per box, in order, from one seeded generator."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (ph, pw, 3), dtype=np.uint8) for _, _, pw, ph in pboxes]


def _border_np(img: np.ndarray) -> np.ndarray:  # (H, W, 3) -> (n, 3) border pixels
    return np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])


def _border_t(x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 3, n) border pixels
    return torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)


@dataclass(frozen=True)
class Occlusion(Perturbation):
    """Random boxes pasted over the image, overlaps allowed.

    Paper (docs/method.md §1, `occlusion_noise`): 50 boxes of uniform random RGB noise, width
    U(0.05, 0.15)·W, height U(0.05, 0.15)·H, uniform position (≈ 39 % of the area covered).
    `mean` and `background` fills (not in the paper) paste the image's per-channel mean colour or
    the lower median of its 1-pixel border: occluders that look like the data, so a model's
    reaction measures lost content rather than surprise at noise (docs/perturbations.md).
    Box corners are floored and sides rounded to whole pixels (at least 1 px).
    """

    name: str = "occlusion_noise"
    kind: str = "removing"
    n_patches: int = field(default=50, metadata={"help": "number of boxes"})
    size: tuple[float, float] = field(default=(0.05, 0.15), metadata={"help": "side range, of W/H"})
    fill: str = field(default="noise", metadata={"help": f"one of {FILLS}"})
    params_help = {
        "boxes": "[x, y, w, h] per box as fractions of W and H",
        "noise_seed": "seed of the noise patches (noise fill only)",
    }

    def __post_init__(self):
        super().__post_init__()
        if self.fill not in FILLS:
            raise ValueError(f"{self.name}: fill must be one of {FILLS}, got {self.fill!r}")

    def sample(self, rng_or_seed, width, height):
        rng = as_rng(rng_or_seed)
        wh = rng.uniform(*self.size, size=(self.n_patches, 2))  # (P, 2)
        xy = rng.uniform(0.0, 1.0, size=(self.n_patches, 2)) * (1.0 - wh)  # (P, 2), box inside
        params = {"boxes": np.concatenate([xy, wh], axis=1).tolist()}
        if self.fill == "noise":
            params["noise_seed"] = int(rng.integers(2**31))
        return params

    def summary(self, params):
        return f"{len(params['boxes'])} boxes, {self.fill}"

    def apply_numpy(self, img, params):
        h, w = img.shape[:2]
        pboxes = _pixel_boxes(params["boxes"], w, h)
        out = img.copy()
        if self.fill == "noise":
            fills = _noise_patches(params["noise_seed"], pboxes)
        else:
            if self.fill == "mean":
                c = np.asarray(cv2.mean(img)[:3])  # OpenCV's mean: 200x faster than numpy's on uint8
            else:
                c = np.sort(_border_np(img), 0)[(2 * (h + w) - 1) // 2]  # lower median, like torch's
            fills = [np.round(c).astype(np.uint8)] * len(pboxes)
        for (x0, y0, pw, ph), f in zip(pboxes, fills):
            out[y0 : y0 + ph, x0 : x0 + pw] = f
        return out

    def apply_tensor(self, x, params):
        b, _, h, w = x.shape
        pboxes = _pixel_boxes(params["boxes"], w, h)
        out = x.clone()
        if self.fill == "noise":
            for (x0, y0, pw, ph), f in zip(pboxes, _noise_patches(params["noise_seed"], pboxes)):
                patch = torch.from_numpy(f).to(x.device).permute(2, 0, 1).float() / 255.0  # (3, ph, pw)
                out[..., y0 : y0 + ph, x0 : x0 + pw] = patch
            return out
        if self.fill == "mean":
            c = x.mean(dim=(2, 3))  # (B, 3)
        else:
            c = _border_t(x).median(dim=-1).values  # (B, 3), lower median like the numpy path
        for x0, y0, pw, ph in pboxes:
            out[..., y0 : y0 + ph, x0 : x0 + pw] = c[:, :, None, None]
        return out


register_perturbation(Occlusion())
register_perturbation(Occlusion(name="occlusion_mean", fill="mean"))
register_perturbation(Occlusion(name="occlusion_background", fill="background"))


@register_perturbation
@dataclass(frozen=True)
class PatchBlackout(Perturbation):
    """PAPO's masked view: the image cut into 14-px cells from the top-left corner (Qwen2.5-VL's
    patch size; edge cells may be partial), each cell blacked out independently with p = 0.6.

    The mask is recorded bit-packed as hex, so replay does not depend on the RNG; replaying on
    an image whose grid has another shape is an error.
    """

    name: str = "patch_blackout"
    kind: str = "removing"
    patch: int = field(default=14, metadata={"help": "cell side in pixels"})
    p: float = field(default=0.6, metadata={"help": "probability that a cell is blacked out"})
    params_help = {
        "patch": "cell side in pixels",
        "grid": "[rows, cols] of cells",
        "mask": "row-major cell mask, numpy packbits as hex (1 = black)",
    }

    def sample(self, rng_or_seed, width, height):
        gh, gw = math.ceil(height / self.patch), math.ceil(width / self.patch)
        mask = as_rng(rng_or_seed).random((gh, gw)) < self.p  # (gh, gw)
        return {"patch": self.patch, "grid": [gh, gw], "mask": np.packbits(mask.ravel()).tobytes().hex()}

    def summary(self, params):
        gh, gw = params["grid"]
        frac = float(self._cells(params).mean())
        return f"{gh}x{gw} cells, {frac:.0%} black"

    @staticmethod
    def _cells(params) -> np.ndarray:
        gh, gw = params["grid"]
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(params["mask"]), dtype=np.uint8))
        return bits[: gh * gw].reshape(gh, gw).astype(bool)

    def keep(self, params, w: int, h: int) -> np.ndarray:
        """(H, W) bool, True where the pixel survives."""
        p = params["patch"]
        if params["grid"] != [math.ceil(h / p), math.ceil(w / p)]:
            raise ValueError(
                f"{self.name}: mask drawn for a {params['grid']} grid of {p}-px cells, "
                f"which does not fit a {w}x{h} image"
            )
        cells = self._cells(params)
        return ~np.repeat(np.repeat(cells, p, axis=0), p, axis=1)[:h, :w]

    def apply_numpy(self, img, params):
        h, w = img.shape[:2]
        return img * self.keep(params, w, h)[..., None]

    def apply_tensor(self, x, params):
        h, w = x.shape[-2:]
        keep = torch.from_numpy(self.keep(params, w, h)).to(x.device)  # (H, W)
        return x * keep


@register_perturbation
@dataclass(frozen=True)
class GreyFill(Perturbation):
    """The whole image replaced by its mean grey level (mean over pixels and channels): every bit
    of content gone, brightness kept. No random parameters."""

    name: str = "grey_fill"
    kind: str = "removing"

    def sample(self, rng_or_seed, width, height):
        return {}

    def summary(self, params):
        return "mean grey"

    def apply_numpy(self, img, params):
        return np.full_like(img, round(float(img.mean())))

    def apply_tensor(self, x, params):
        return x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x).clone()  # (B, 3, H, W)
