"""The one image loader of cppo: a file, bytes or an in-memory image in, a decoded RGB image out.

    image = load_image("photo.jpg")                       # ImageError (a ValueError) names the problem
    image = load_image({"bytes": b"...", "path": "x.png"})  # a datasets Image feature's value

Every command reads images through it (cppo-perturb, cppo-detect, and the data loader behind
cppo-train and cppo-eval), so a picture means the same thing to all of them:
- EXIF orientation is applied (a phone photo stored sideways is seen upright);
- the mode becomes RGB by `to_rgb`'s rule (alpha on white, palettes expanded, 16-bit scaled to
  8 bits, not clipped);
- decompression bombs are refused (Pillow's `MAX_IMAGE_PIXELS` limit, its warning made an error);
- a path that is a folder, a FIFO or a device is refused as "not a regular file" (opening a FIFO
  would block), a missing one as "not found".
"""

from __future__ import annotations

import io
import stat
import warnings
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from cppo.perturb.image import to_rgb


class ImageError(ValueError):
    """An image that cannot be used, with a one-line reason (`reason`) and what it was (`detail`)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _open_source(source, base: Path | None):
    """A file path or a BytesIO for `source` (path, bytes, {"bytes", "path"})."""
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(source)
    if not isinstance(source, (str, Path)):
        raise ImageError("unsupported image value", type(source).__name__)
    path = Path(source) if base is None or Path(source).is_absolute() else Path(base) / source
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ImageError("image not found", str(path)) from None
    except OSError as e:
        raise ImageError("cannot read image", f"{path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise ImageError("not a regular file", str(path))
    return path


_TURNED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


@contextmanager
def _opened(source, base: str | Path | None):
    """The PIL image of `source` (path, bytes or dict), opened lazily, bombs refused; every failure
    to open or decode inside the block is an ImageError naming the file."""
    fp = _open_source(source, Path(base) if base is not None else None)
    where = str(fp) if isinstance(fp, Path) else "image bytes"
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp) as image:
                yield image
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError("image too large (decompression bomb)", f"{where}: {e}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageError("cannot read image", f"{where}: {e}") from None


def image_size_of(source, base: str | Path | None = None) -> tuple[int, int]:
    """(width, height) as `load_image` would return it (EXIF orientation applied), from the file's
    header alone: no pixel is decoded. Raises ImageError like `load_image`."""
    if isinstance(source, Image.Image):
        return load_image(source).size
    with _opened(source, base) as image:
        w, h = image.size
        turned = image.getexif().get(0x0112) in _TURNED  # 0x0112: Orientation
    return (h, w) if turned else (w, h)


def load_image(source, base: str | Path | None = None) -> Image.Image:
    """A decoded RGB PIL image from a path (relative to `base` if given), bytes, a
    ``{"bytes", "path"}`` dict or a PIL image; raises ImageError."""
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source) or source)
    with _opened(source, base) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image) or image)
