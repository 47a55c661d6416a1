"""Information-preserving (I+) and information-removing (I-) views of an image (docs/method.md §1).

    from cppo.perturb import get_preset, get_perturbation, list_perturbations
    pos, neg, record = get_preset("paper").draw(image, seed=0)
    params = get_perturbation("rotate").sample(seed, width, height)   # JSON-serialisable dict
    out = get_perturbation("rotate").apply(image, params)              # replayable, deterministic

Image contract (every entry, every preset):
    * Accepted: PIL images; numpy arrays (H, W), (H, W, 1|2|3|4); torch tensors (B, C, H, W) or
      (C, H, W) with C in {1, 3, 4}, float in [0, 1] (or uint8 0..255), on any device.
    * Returned: the same type, width, height and dtype (and device, and batch axis or not).
      Colour layout becomes RGB: PIL images come back in mode "RGB", arrays as (H, W, 3) uint8,
      tensors with C = 3.
    * Conversion to RGB: greyscale is repeated to three channels; an alpha channel (RGBA, LA,
      palette with transparency, C = 4 tensors) is composited on white, as Qwen2.5-VL's own
      image loader does; palette images are expanded; 16-bit and 32-bit integer images are
      scaled linearly (65535 -> 255), not clipped at 255 as PIL's `convert` would; numpy float
      arrays are read as [0, 1] and become uint8. `to_rgb(image)` applies this rule to a PIL image
      (PIL in, PIL "RGB" out) wherever else cppo needs one.
    * Every perturbation keeps width and height, down to 1×1 (geometric entries return 1-pixel
      -wide images unchanged) and up to any size.
    * Tensors: one param dict applies to the whole batch (replay needs one record); pass a
      list of B dicts (`Perturbation.sample_batch`) to perturb each element differently. Random
      fills (noise) are regenerated from a seed in the params with numpy, so the tensor path and
      the numpy path, on CPU or GPU, see the same noise.
    * Backends: albumentations/OpenCV on (H, W, 3) uint8 for PIL and numpy inputs, kornia on
      (B, 3, H, W) float32 for tensors. The two paths agree to a few grey levels (JPEG: kornia's
      differentiable codec vs libjpeg, more), not bit for bit.

Registered entries and presets (the `PERTURBATIONS` and `PRESETS` registries, `cppo.registry.Registry`
like every other registry in cppo) are listed by `list_perturbations()` / `list_presets()` and
documented, with measured information survival rates, in docs/perturbations.md.
"""

from cppo.perturb import geometry, occlusion, photometric  # noqa: F401  (register the entries)
from cppo.perturb.base import (
    KINDS,
    PERTURBATIONS,
    Perturbation,
    UnknownNameError,
    get_perturbation,
    list_perturbations,
    register_perturbation,
)
from cppo.perturb.image import image_size, to_rgb
from cppo.perturb.load import ImageError, image_size_of, load_image
from cppo.perturb.presets import (
    PRESETS,
    Preset,
    get_preset,
    list_presets,
    load_preset,
    preset_from_dict,
    register_preset,
)

__all__ = [
    "ImageError",
    "KINDS",
    "PERTURBATIONS",
    "PRESETS",
    "Perturbation",
    "Preset",
    "UnknownNameError",
    "get_perturbation",
    "get_preset",
    "image_size",
    "image_size_of",
    "list_perturbations",
    "list_presets",
    "load_image",
    "load_preset",
    "preset_from_dict",
    "register_perturbation",
    "register_preset",
    "to_rgb",
]
