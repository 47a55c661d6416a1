"""Geometric perturbations: random perspective, rotation, small translate/scale, zoom crop.

Each draws a geometry in relative units (fractions of W and H, degrees), builds one 3×3 pixel
matrix for the image at hand, and warps with it: albumentations `Perspective.apply` /
`Affine.apply` (OpenCV, bilinear, black fill) on the numpy path, kornia `warp_perspective` /
`warp_affine` (bilinear, zero padding, pixel-centre coordinates like OpenCV) on the tensor
path. Relative units make a draw replayable on an image of another size. Images narrower or
shorter than 2 pixels have no geometry to warp and come back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import albumentations as A
import cv2
import kornia
import numpy as np
import torch
from albumentations.augmentations.geometric import functional as fgeometric

from cppo.perturb.base import Perturbation, as_rng, register_perturbation


def _affine_numpy(img: np.ndarray, m: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    warp = A.Affine(interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_CONSTANT, fill=0)
    return warp.apply(img, matrix=m, output_shape=(h, w))


def _affine_tensor(x: torch.Tensor, m: np.ndarray) -> torch.Tensor:
    b, _, h, w = x.shape
    mt = torch.as_tensor(m[:2], dtype=x.dtype, device=x.device).expand(b, 2, 3)  # (B, 2, 3)
    return kornia.geometry.transform.warp_affine(x, mt, (h, w), align_corners=True)


def _centre_matrix(w: int, h: int, angle: float, scale: float, tx: float, ty: float) -> np.ndarray:
    """3×3 pixel matrix: rotate `angle` degrees counter-clockwise and scale about the image centre,
    then shift by (tx, ty) pixels."""
    m = np.eye(3)
    m[:2] = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle, scale)
    m[0, 2] += tx
    m[1, 2] += ty
    return m


def _too_small(shape) -> bool:
    return min(shape[-2], shape[-1]) < 2


@register_perturbation
@dataclass(frozen=True)
class RandomPerspective(Perturbation):
    """Paper (docs/method.md §1): torchvision-style random perspective, distortion scale 0.2, p = 0.5.

    Each corner moves inward by U(0, d/2)·W horizontally and U(0, d/2)·H vertically, as in
    torchvision's `RandomPerspective` (which draws whole pixels; here the offsets are continuous
    fractions so they replay on any size). Not applied (identity) with probability 1 - p.
    """

    name: str = "perspective"
    kind: str = "preserving"
    distortion_scale: float = field(default=0.2, metadata={"help": "corner shift ≤ d/2 of W, H"})
    p: float = field(default=0.5, metadata={"help": "probability of distorting at all (else identity)"})
    params_help = {
        "applied": "false: the identity",
        "offsets": "inward shift [dx, dy] of the corners TL, TR, BR, BL, as fractions of W and H",
    }

    def sample(self, rng_or_seed, width, height):
        rng = as_rng(rng_or_seed)
        applied = bool(rng.random() < self.p)
        offsets = rng.uniform(0.0, self.distortion_scale / 2.0, size=(4, 2))  # (corner, xy)
        return {"applied": applied, "offsets": offsets.tolist() if applied else []}

    def matrix(self, params, w: int, h: int) -> np.ndarray:
        start = np.array([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], dtype=np.float32)
        inward = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype=np.float32)
        end = start + inward * np.asarray(params["offsets"], dtype=np.float32) * np.float32([w, h])
        return cv2.getPerspectiveTransform(start, end)  # (3, 3), maps the old corners to the new

    def summary(self, params):
        return f"applied={params['applied']}"

    def apply_numpy(self, img, params):
        if not params["applied"] or _too_small(img.shape[:2]):
            return img.copy()
        h, w = img.shape[:2]
        warp = A.Perspective(keep_size=False, border_mode=cv2.BORDER_CONSTANT, fill=0)
        return warp.apply(img, matrix=self.matrix(params, w, h), max_height=h, max_width=w)

    def apply_tensor(self, x, params):
        if not params["applied"] or _too_small(x.shape):
            return x.clone()
        b, _, h, w = x.shape
        m = torch.as_tensor(self.matrix(params, w, h), dtype=x.dtype, device=x.device).expand(b, 3, 3)
        return kornia.geometry.transform.warp_perspective(x, m, (h, w), align_corners=True)


@register_perturbation
@dataclass(frozen=True)
class Rotate(Perturbation):
    """Paper (docs/method.md §1): rotation by U(-10°, 10°) about the centre, same canvas, black fill.

    Positive angles turn the picture counter-clockwise (torchvision's and OpenCV's convention).
    """

    name: str = "rotate"
    kind: str = "preserving"
    max_degrees: float = field(default=10.0, metadata={"help": "angle ~ U(-max, max) degrees"})
    params_help = {"angle": "degrees, counter-clockwise"}

    def sample(self, rng_or_seed, width, height):
        return {"angle": float(as_rng(rng_or_seed).uniform(-self.max_degrees, self.max_degrees))}

    def apply_numpy(self, img, params):
        if _too_small(img.shape[:2]):
            return img.copy()
        h, w = img.shape[:2]
        return _affine_numpy(img, _centre_matrix(w, h, params["angle"], 1.0, 0.0, 0.0))

    def apply_tensor(self, x, params):
        if _too_small(x.shape):
            return x.clone()
        h, w = x.shape[-2:]
        return _affine_tensor(x, _centre_matrix(w, h, params["angle"], 1.0, 0.0, 0.0))


@register_perturbation
@dataclass(frozen=True)
class TranslateScale(Perturbation):
    """Small shift and zoom about the centre, black fill: the layout moves a little, nothing is lost
    but a thin border (not in the paper; a common mild geometric view)."""

    name: str = "translate_scale"
    kind: str = "preserving"
    max_translate: float = field(default=0.05, metadata={"help": "shift ~ U(-m, m)·W (and ·H)"})
    scale: tuple[float, float] = field(default=(0.9, 1.1), metadata={"help": "zoom factor range"})
    params_help = {
        "translate_x": "shift as a fraction of W",
        "translate_y": "shift as a fraction of H",
        "scale": "zoom factor about the centre",
    }

    def sample(self, rng_or_seed, width, height):
        rng = as_rng(rng_or_seed)
        t = self.max_translate
        return {
            "translate_x": float(rng.uniform(-t, t)),
            "translate_y": float(rng.uniform(-t, t)),
            "scale": float(rng.uniform(*self.scale)),
        }

    def _m(self, params, w, h):
        tx, ty = params["translate_x"] * w, params["translate_y"] * h
        return _centre_matrix(w, h, 0.0, params["scale"], tx, ty)

    def apply_numpy(self, img, params):
        if _too_small(img.shape[:2]):
            return img.copy()
        h, w = img.shape[:2]
        return _affine_numpy(img, self._m(params, w, h))

    def apply_tensor(self, x, params):
        if _too_small(x.shape):
            return x.clone()
        h, w = x.shape[-2:]
        return _affine_tensor(x, self._m(params, w, h))


@register_perturbation
@dataclass(frozen=True)
class ZoomCrop(Perturbation):
    """Paper (docs/method.md §1): crop s·W × s·H at a uniformly random position, s ~ U(0.6, 0.7),
    resize back to W × H (bilinear).

    As the official `RandomZoomCrop` (vbdi/cppo verl/recipe/cppo/cppo_dataset.py): crop sides are
    int(s·W) × int(s·H) (at least 1 px here), and the window's left and top edges are uniform over
    the whole pixels where it fits, {0, ..., W - int(s·W)} and {0, ..., H - int(s·H)}, like Python's
    `randint`. The draw keeps them as `left`, `top` in [0, 1): the fraction of the free room, so it
    replays on an image of another size. numpy: OpenCV bilinear through albumentations' `resize`;
    tensor: kornia `resize` (bilinear, half-pixel centres like OpenCV).
    """

    name: str = "zoom_crop"
    kind: str = "removing"
    scale: tuple[float, float] = field(default=(0.6, 0.7), metadata={"help": "side fraction kept, range"})
    params_help = {
        "scale": "kept fraction of each side",
        "left": "window's left edge: floor(left·(W - cw + 1)) px, left ~ U[0, 1)",
        "top": "window's top edge: floor(top·(H - ch + 1)) px, top ~ U[0, 1)",
    }

    def sample(self, rng_or_seed, width, height):
        rng = as_rng(rng_or_seed)
        scale = float(rng.uniform(*self.scale))
        return {"scale": scale, "left": float(rng.random()), "top": float(rng.random())}

    @staticmethod
    def box(params, w: int, h: int) -> tuple[int, int, int, int]:
        """(x0, y0, cw, ch) of the crop in pixels: each edge uniform over the positions that fit."""
        cw, ch = max(1, int(params["scale"] * w)), max(1, int(params["scale"] * h))
        x0 = min(w - cw, int(params["left"] * (w - cw + 1)))  # (room + 1) positions, each equally likely
        y0 = min(h - ch, int(params["top"] * (h - ch + 1)))
        return x0, y0, cw, ch

    def apply_numpy(self, img, params):
        h, w = img.shape[:2]
        x0, y0, cw, ch = self.box(params, w, h)
        return fgeometric.resize(img[y0 : y0 + ch, x0 : x0 + cw], (h, w), cv2.INTER_LINEAR)

    def apply_tensor(self, x, params):
        h, w = x.shape[-2:]
        x0, y0, cw, ch = self.box(params, w, h)
        crop = x[..., y0 : y0 + ch, x0 : x0 + cw]  # (B, 3, ch, cw)
        return kornia.geometry.transform.resize(crop, (h, w), interpolation="bilinear", align_corners=False)
