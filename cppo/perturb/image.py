"""The image contract at the boundary of every perturbation (see the package docstring).

Two internal forms, one per backend:
    numpy  (H, W, 3) uint8 RGB       -> albumentations / OpenCV
    tensor (B, 3, H, W) float32 [0,1] -> kornia, on the input's device

`to_array` / `to_batch` convert any accepted input into one of them and return a `restore`
function that turns the result back into the caller's type, size and dtype. `to_rgb` is the same
conversion from PIL image to PIL image, for every other place that needs an RGB image.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

WHITE = 255


def image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image, an (H, W[, C]) array or a ([B,] C, H, W) tensor."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, torch.Tensor):
        return int(image.shape[-1]), int(image.shape[-2])
    if isinstance(image, np.ndarray):
        return int(image.shape[1]), int(image.shape[0])
    raise TypeError(f"expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(H, W, 3) and (H, W) uint8 -> (H, W, 3) uint8, as if the image were pasted on white paper."""
    a = alpha.astype(np.float32)[..., None] / 255.0
    out = rgb.astype(np.float32) * a + WHITE * (1.0 - a)
    return np.round(out).astype(np.uint8)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Any numeric array -> uint8 of the same shape, by the rule documented in the package docstring."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        # floats are read as [0, 1] intensities (the tensor convention), values outside are clipped
        return np.round(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)
    # integer types wider than 8 bit: 16-bit full range scaled down linearly (65535 -> 255)
    return np.round(np.clip(arr.astype(np.float64), 0, 65535) / 257.0).astype(np.uint8)


def array_rgb(arr: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array of any numeric dtype -> (H, W, 3) uint8 RGB."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 1|2|3|4) image array, got shape {arr.shape}")
    arr = _to_uint8(arr)
    c = arr.shape[2]
    if c == 1:
        return np.repeat(arr, 3, axis=2)
    if c == 2:  # grey + alpha
        return _composite_on_white(np.repeat(arr[..., :1], 3, axis=2), arr[..., 1])
    if c == 4:
        return _composite_on_white(arr[..., :3], arr[..., 3])
    return np.ascontiguousarray(arr)


def pil_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL image -> (H, W, 3) uint8 RGB, without PIL's clipping of 16-bit values to 255."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode.startswith("I") or mode == "F":
        arr = np.asarray(img)
        if mode == "F":  # 32-bit float: read as 0..255 intensities, like PIL's own "L" conversion
            return array_rgb(np.round(np.clip(arr, 0, 255)).astype(np.uint8))
        return array_rgb(arr.astype(np.int64))  # 'I', 'I;16', 'I;16B', ...: 16-bit full range
    elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    return array_rgb(np.asarray(img))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> a new PIL image in mode "RGB", by the rule of `pil_rgb` (alpha composited on
    white, palettes expanded, 16-bit scaled, not clipped). The one RGB conversion of cppo: the
    perturbations, the bundled sample, images read by `cppo-perturb` and the detector's report."""
    return Image.fromarray(pil_rgb(image), mode="RGB")


def to_array(image) -> tuple[np.ndarray, Callable[[np.ndarray], object]]:
    """PIL image or numpy array -> ((H, W, 3) uint8, restore). restore gives back the input's type."""
    if isinstance(image, Image.Image):
        return pil_rgb(image), lambda out: Image.fromarray(out, mode="RGB")
    if isinstance(image, np.ndarray):
        return array_rgb(image), lambda out: out
    raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


def to_batch(image: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """([B,] C, H, W) tensor -> ((B, 3, H, W) float32 in [0, 1], restore).

    C = 1 is repeated to RGB, C = 4 is composited on white; restore casts back to the input's
    dtype (uint8 tensors are read as 0..255) and drops the batch axis if the input had none.
    """
    if image.ndim not in (3, 4):
        raise ValueError(f"expected a (B, C, H, W) or (C, H, W) tensor, got shape {tuple(image.shape)}")
    squeeze = image.ndim == 3
    x = image.unsqueeze(0) if squeeze else image  # (B, C, H, W)
    dtype = x.dtype
    if dtype == torch.uint8:
        x = x.float() / 255.0
    elif dtype.is_floating_point:
        x = x.float().clamp(0.0, 1.0)
    else:
        raise TypeError(f"expected a float or uint8 tensor, got {dtype}")
    c = x.shape[1]
    if c == 1:
        x = x.expand(-1, 3, -1, -1)
    elif c == 4:
        a = x[:, 3:4]
        x = x[:, :3] * a + (1.0 - a)
    elif c != 3:
        raise ValueError(f"expected 1, 3 or 4 channels, got {c}")
    x = x.contiguous()

    def restore(out: torch.Tensor) -> torch.Tensor:
        out = out.clamp(0.0, 1.0)
        out = (out * 255).round().to(torch.uint8) if dtype == torch.uint8 else out.to(dtype)
        return out.squeeze(0) if squeeze else out

    return x, restore
