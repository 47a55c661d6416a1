"""Pixel-value perturbations: identity, colour jitter, Gaussian noise, Gaussian blur, JPEG.

numpy path: albumentations' transforms called with explicit parameters (`T().apply(img, **p)`);
tensor path: kornia.enhance / kornia.filters on (B, 3, H, W) float32 in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import albumentations as A
import kornia
import numpy as np
import torch
from albumentations.augmentations.blur import functional as fblur

from cppo.perturb.base import Perturbation, as_rng, register_perturbation


def _noise_map(seed: int, height: int, width: int) -> np.ndarray:
    """(H, W, 3) float32 standard normal, a pure function of the seed (numpy PCG64), so the numpy
    and tensor paths and any replay see the same noise."""
    return np.random.default_rng(seed).standard_normal((height, width, 3), dtype=np.float32)


@register_perturbation
@dataclass(frozen=True)
class Identity(Perturbation):
    """The unchanged image: the positive view of presets without one (PAPO)."""

    name: str = "identity"
    kind: str = "preserving"

    def sample(self, rng_or_seed, width, height):
        return {}

    def apply_numpy(self, img, params):
        return img.copy()

    def apply_tensor(self, x, params):
        return x.clone()


@register_perturbation
@dataclass(frozen=True)
class ColorJitter(Perturbation):
    """Paper (docs/method.md §1): brightness, contrast and saturation factors in random order, hue untouched.

    torchvision semantics on both paths: brightness multiplies, contrast blends with the mean
    grey level, saturation blends with the greyscale image (albumentations `ColorJitter.apply`;
    kornia `adjust_brightness_accumulative`, `adjust_contrast_with_mean_subtraction`,
    `adjust_saturation_with_gray_subtraction`).
    """

    name: str = "color_jitter"
    kind: str = "preserving"
    brightness: tuple[float, float] = field(default=(0.2, 1.3), metadata={"help": "brightness factor range"})
    contrast: tuple[float, float] = field(default=(0.2, 1.8), metadata={"help": "contrast factor range"})
    saturation: tuple[float, float] = field(default=(0.2, 1.8), metadata={"help": "saturation factor range"})
    params_help = {
        "brightness": "multiplicative brightness factor",
        "contrast": "contrast factor (1 = unchanged)",
        "saturation": "saturation factor (0 = grey, 1 = unchanged)",
        "order": "order of application, a permutation of [0 brightness, 1 contrast, 2 saturation]",
    }

    def sample(self, rng_or_seed, width, height):
        rng = as_rng(rng_or_seed)
        return {
            "brightness": float(rng.uniform(*self.brightness)),
            "contrast": float(rng.uniform(*self.contrast)),
            "saturation": float(rng.uniform(*self.saturation)),
            "order": [int(i) for i in rng.permutation(3)],
        }

    def apply_numpy(self, img, params):
        return A.ColorJitter().apply(
            img, params["brightness"], params["contrast"], params["saturation"], 0.0, params["order"]
        )

    def apply_tensor(self, x, params):
        ops = (
            kornia.enhance.adjust_brightness_accumulative,
            kornia.enhance.adjust_contrast_with_mean_subtraction,
            kornia.enhance.adjust_saturation_with_gray_subtraction,
        )
        factors = (params["brightness"], params["contrast"], params["saturation"])
        for i in params["order"]:
            x = ops[i](x, float(factors[i])).clamp(0.0, 1.0)  # (B, 3, H, W)
        return x


@register_perturbation
@dataclass(frozen=True)
class GaussianNoise(Perturbation):
    """Additive pixel noise, std drawn per call, on [0, 1] intensities.

    Mild by default (std ≤ 0.05, i.e. ≤ 13/255), hence "preserving". The noise map is
    regenerated from `noise_seed`, so for a tensor batch with one param dict every element gets
    the same noise. numpy path: albumentations `GaussNoise.apply(img, noise_map)`.
    """

    name: str = "gaussian_noise"
    kind: str = "preserving"
    std: tuple[float, float] = field(default=(0.02, 0.05), metadata={"help": "noise std range, [0, 1] units"})
    params_help = {
        "std": "noise standard deviation on [0, 1] intensities",
        "noise_seed": "seed of the noise map",
    }

    def sample(self, rng_or_seed, width, height):
        rng = as_rng(rng_or_seed)
        return {"std": float(rng.uniform(*self.std)), "noise_seed": int(rng.integers(2**31))}

    def apply_numpy(self, img, params):
        h, w = img.shape[:2]
        noise = _noise_map(params["noise_seed"], h, w) * (params["std"] * 255.0)  # (H, W, 3)
        # albumentations' add_noise truncates when it casts back to uint8; round half up instead
        # so both paths agree to one grey level
        return A.GaussNoise().apply(img, noise_map=noise + 0.5)

    def apply_tensor(self, x, params):
        h, w = x.shape[-2:]
        noise = torch.from_numpy(_noise_map(params["noise_seed"], h, w)).permute(2, 0, 1)  # (3, H, W)
        return (x + noise.to(x.device) * params["std"]).clamp(0.0, 1.0)


def _blur_kernel_size(sigma: float) -> int:
    return 2 * math.ceil(3.0 * sigma) + 1  # covers ±3 sigma; odd


@register_perturbation
@dataclass(frozen=True)
class GaussianBlur(Perturbation):
    """Gaussian blur, sigma drawn per call, kernel 2·ceil(3σ)+1, reflected borders.

    numpy: albumentations `GaussianBlur.apply(img, kernel)`; tensor: kornia `gaussian_blur2d`
    (its reflect padding needs the image larger than half the kernel, so the kernel is cut
    down on tiny images).
    """

    name: str = "gaussian_blur"
    kind: str = "preserving"
    sigma: tuple[float, float] = field(default=(0.5, 1.5), metadata={"help": "sigma range in pixels"})
    params_help = {"sigma": "blur standard deviation in pixels"}

    def sample(self, rng_or_seed, width, height):
        return {"sigma": float(as_rng(rng_or_seed).uniform(*self.sigma))}

    def apply_numpy(self, img, params):
        k = _blur_kernel_size(params["sigma"])
        kernel = fblur.create_gaussian_kernel_1d(params["sigma"], k)
        return A.GaussianBlur().apply(img, kernel=kernel)

    def apply_tensor(self, x, params):
        h, w = x.shape[-2:]
        k = _blur_kernel_size(params["sigma"])
        ky, kx = min(k, 2 * h - 1), min(k, 2 * w - 1)  # reflect pad k//2 must stay below the size
        s = params["sigma"]
        return kornia.filters.gaussian_blur2d(x, (ky, kx), (s, s), border_type="reflect")


@register_perturbation
@dataclass(frozen=True)
class JpegCompression(Perturbation):
    """JPEG compression at a quality drawn per call.

    numpy: albumentations `ImageCompression.apply` (OpenCV's libjpeg, 4:2:0 chroma);
    tensor: kornia `jpeg_codec_differentiable`, a differentiable model of the same codec. The
    two agree to a few grey levels, not bit for bit.
    """

    name: str = "jpeg"
    kind: str = "preserving"
    quality: tuple[int, int] = field(default=(30, 70), metadata={"help": "JPEG quality range, inclusive"})
    params_help = {"quality": "JPEG quality, 1..100"}

    def sample(self, rng_or_seed, width, height):
        lo, hi = self.quality
        return {"quality": int(as_rng(rng_or_seed).integers(lo, hi + 1))}

    def apply_numpy(self, img, params):
        return A.ImageCompression().apply(img, quality=params["quality"], image_type=".jpg")

    def apply_tensor(self, x, params):
        q = torch.full((x.shape[0],), float(params["quality"]), device=x.device)
        return kornia.enhance.jpeg_codec_differentiable(x, q).clamp(0.0, 1.0)
