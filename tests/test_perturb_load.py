"""The one image loader (cppo.perturb.load): what every command sees of a picture."""

import numpy as np
import pytest
from PIL import Image

from cppo.perturb import ImageError, image_size_of, load_image
from cppo.rl.checks import open_image
from cppo.rl.sources import DataError


def _turned(tmp_path):
    """A 20 x 10 photo stored sideways: EXIF orientation 6 (rotate 90 degrees clockwise to view)."""
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 5, 10))  # the stored left edge is red
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "turned.jpg"
    img.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied_by_every_reader(tmp_path):
    path = _turned(tmp_path)
    seen = load_image(path)
    assert seen.size == (10, 20) == image_size_of(path)  # upright: 10 wide, 20 tall
    assert open_image(path).size == (10, 20)  # the data loader of cppo-train and cppo-eval
    top = np.asarray(seen)[:3].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[1] < 60  # the stored left edge is now the top


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    arr = np.full((4, 4), 32768, dtype=np.uint16)  # mid-grey at 16 bits
    path = tmp_path / "grey16.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    value = np.asarray(load_image(path))[0, 0]
    assert 120 <= value[0] <= 135, value  # clipping would give 255


def test_a_folder_or_a_missing_file_is_named_as_such(tmp_path):
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="image not found"):
        image_size_of(tmp_path / "nope.png")
    with pytest.raises(DataError, match="missing image file"):  # the data loader's counted reason
        open_image(tmp_path / "nope.png")
