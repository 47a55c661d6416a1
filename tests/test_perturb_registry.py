"""Every registry entry against the image contract: types, sizes, determinism, replay, backends.

Parametrised over `list_perturbations()`, so a newly registered entry is covered automatically.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cppo.perturb import (
    PERTURBATIONS,
    Perturbation,
    UnknownNameError,
    get_perturbation,
    list_perturbations,
    register_perturbation,
    to_rgb,
)

torch.set_num_threads(1)

ENTRIES = list_perturbations()
REMOVING = list_perturbations("removing")
H, W = 36, 50


def textured(h=H, w=W, seed=0) -> np.ndarray:
    """(h, w, 3) uint8: smooth gradients plus coloured blocks, so every view has something to change."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack(
        [
            xx / max(w - 1, 1) * 200 + 30,
            yy / max(h - 1, 1) * 200 + 30,
            (xx + yy) / max(h + w - 2, 1) * 120 + 60,
        ],
        axis=-1,
    )
    rng = np.random.default_rng(seed)
    for _ in range(4):
        y0, x0 = rng.integers(0, max(h - 8, 1)), rng.integers(0, max(w - 8, 1))
        img[y0 : y0 + 8, x0 : x0 + 8] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def as_tensor(img: np.ndarray, batch=2) -> torch.Tensor:
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 255.0  # (3, H, W)
    return x.unsqueeze(0).repeat(batch, 1, 1, 1)  # (B, 3, H, W)


def to_uint8(x: torch.Tensor) -> np.ndarray:  # (3, H, W) float -> (H, W, 3) uint8
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@pytest.mark.parametrize("name", ENTRIES)
def test_type_size_dtype_kept(name):
    p = get_perturbation(name)
    img = textured()
    out = p(Image.fromarray(img), 1)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (W, H)
    out = p(img, 1)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == (H, W, 3)
    for dtype in (torch.float32, torch.float64):
        x = as_tensor(img).to(dtype)
        out = p(x, 1)
        assert out.shape == (2, 3, H, W) and out.dtype == dtype and out.device == x.device
        assert 0.0 <= out.min() and out.max() <= 1.0
    out = p(as_tensor(img)[0], 1)  # (C, H, W): no batch axis in, none out
    assert out.shape == (3, H, W)


@pytest.mark.parametrize("name", ENTRIES)
def test_params_json_and_replay(name):
    p = get_perturbation(name)
    img = textured()
    for seed in (0, 7):
        params = p.sample(seed, W, H)
        assert params == p.sample(seed, W, H)  # same seed, same draw
        replayed = json.loads(json.dumps(params))  # a record read back from disk
        assert replayed == params
        np.testing.assert_array_equal(p.apply(img, replayed), p(img, seed))
        np.testing.assert_array_equal(p(img, seed), p(img, seed))
        x = as_tensor(img)
        assert torch.equal(p.apply(x, replayed), p(x, seed))
    # a shared generator gives successive, different draws (unless the entry has no randomness)
    rng = np.random.default_rng(0)
    draws = [json.dumps(p.sample(rng, W, H)) for _ in range(6)]
    assert len(set(draws)) > 1 or draws[0] == "{}"


@pytest.mark.parametrize("name", ENTRIES)
def test_backends_agree(name):
    """The kornia tensor path reproduces the albumentations numpy path to a few grey levels."""
    p = get_perturbation(name)
    img = textured()
    for seed in range(4):
        params = p.sample(seed, W, H)
        a = p.apply(img, params).astype(np.float32)
        b = p.apply(as_tensor(img, 1), params)[0].permute(1, 2, 0).numpy() * 255
        if name == "jpeg":  # kornia's differentiable codec: the same strength of artefacts, other pixels
            err_a, err_b = np.abs(a - img).mean(), np.abs(b - img).mean()
            assert 0.6 < err_b / err_a < 1.5 and np.abs(a - b).mean() < 6, (err_a, err_b)
        else:
            assert np.abs(a - b).mean() < 1.5, (seed, np.abs(a - b).mean())


@pytest.mark.parametrize("name", ENTRIES)
def test_per_element_params(name):
    """A list of B dicts applies one per element; one dict applies to the whole batch."""
    p = get_perturbation(name)
    x = as_tensor(textured(), batch=3)
    plist = p.sample_batch(0, 3, W, H)
    out = p.apply(x, plist)
    for i in range(3):
        assert torch.equal(out[i : i + 1], p.apply(x[i : i + 1], plist[i]))
    shared = p.apply(x, plist[0])
    assert torch.equal(shared[1], shared[0]) and torch.equal(shared[2], shared[0])
    with pytest.raises(ValueError, match="param dicts"):
        p.apply(x, plist[:2])


@pytest.mark.parametrize("name", REMOVING)
def test_removing_entries_change_the_image(name):
    p = get_perturbation(name)
    img = textured()
    for seed in range(5):
        diff = np.abs(p(img, seed).astype(np.int16) - img).mean()
        assert diff > 10, (seed, diff)  # grey levels on 0..255, averaged over all pixels


@pytest.mark.parametrize("name", sorted(set(ENTRIES) - set(REMOVING) - {"identity"}))
def test_preserving_entries_do_something_but_not_much(name):
    p = get_perturbation(name)
    img = textured()
    diffs = [np.abs(p(img, s).astype(np.int16) - img).mean() for s in range(6)]
    assert max(diffs) > 0.5, diffs  # not a silent identity
    assert np.median(diffs) < 60, diffs  # and not a wipe-out


def _unusual_images():
    rng = np.random.default_rng(1)
    rgba = np.dstack([textured(), rng.integers(0, 256, (H, W), dtype=np.uint8)])
    return {
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "L": Image.fromarray(textured()[..., 0], "L"),
        "P": Image.fromarray(textured()).quantize(16),
        "I;16": Image.fromarray(textured()[..., 1].astype(np.uint16) * 257),
        "1x1": Image.fromarray(textured(1, 1)),
        "LA": Image.fromarray(np.dstack([textured()[..., 0], textured()[..., 1]]), "LA"),
    }


@pytest.mark.parametrize("name", ENTRIES)
def test_unusual_inputs(name):
    p = get_perturbation(name)
    for label, img in _unusual_images().items():
        out = p(img, 3)
        assert out.mode == "RGB" and out.size == img.size, label
    # 1×1 on the numpy and tensor paths, greyscale and RGBA arrays, 1- and 4-channel tensors
    assert p(textured(1, 1), 0).shape == (1, 1, 3)
    assert p(as_tensor(textured(1, 1)), 0).shape == (2, 3, 1, 1)
    assert p(textured()[..., 0], 0).shape == (H, W, 3)
    assert p(np.dstack([textured(), np.full((H, W), 255, np.uint8)]), 0).shape == (H, W, 3)
    assert p(as_tensor(textured())[:, :1], 0).shape == (2, 3, H, W)
    assert p(torch.rand(2, 4, H, W), 0).shape == (2, 3, H, W)
    u8 = (as_tensor(textured()) * 255).round().to(torch.uint8)
    out = p(u8, 0)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, H, W)


@pytest.mark.parametrize("name", ENTRIES)
def test_large_image(name):
    img = Image.fromarray(np.tile(textured(50, 60), (40, 50, 1)))  # 3000 wide, 2000 high
    assert get_perturbation(name)(img, 0).size == (3000, 2000)


def test_conversion_to_rgb_is_the_documented_one():
    # alpha composited on white: transparent -> white, opaque -> the colour
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)
    rgba[0, 1] = (10, 20, 30, 255)
    out = get_perturbation("identity")(Image.fromarray(rgba, "RGBA"), 0)
    assert np.asarray(out).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    # 16-bit scaled linearly, not clipped at 255 as PIL's convert("RGB") would
    i16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16))
    assert np.asarray(get_perturbation("identity")(i16, 0))[0, :, 0].tolist() == [0, 100, 255]
    # greyscale repeated to three channels; palette expanded to its colours
    grey = get_perturbation("identity")(Image.fromarray(np.array([[7, 200]], np.uint8), "L"), 0)
    assert np.asarray(grey).tolist() == [[[7, 7, 7], [200, 200, 200]]]
    pal = Image.fromarray(textured()).quantize(8)
    expected = np.asarray(pal.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(get_perturbation("identity")(pal, 0)), expected)
    # 4-channel tensor composited on white
    x = torch.tensor([0.2, 0.4, 0.6, 0.5]).view(1, 4, 1, 1)
    assert torch.allclose(get_perturbation("identity")(x, 0).flatten(), torch.tensor([0.6, 0.7, 0.8]))


def test_to_rgb_is_the_perturbations_conversion():
    # the one PIL -> RGB conversion: what every perturbation does to its input, a new image each time
    rgba = Image.fromarray(np.dstack([textured(), np.tile(np.arange(W, dtype=np.uint8) * 5, (H, 1))]), "RGBA")
    i16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16))
    for img in (rgba, i16, Image.fromarray(textured()).quantize(8), Image.fromarray(textured()).convert("L")):
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == img.size
        np.testing.assert_array_equal(np.asarray(out), np.asarray(get_perturbation("identity")(img, 0)))
    rgb = Image.fromarray(textured())
    assert to_rgb(rgb) is not rgb and np.array_equal(np.asarray(to_rgb(rgb)), textured())


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as e:
        get_perturbation("rotat")
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert "rotat" in str(e.value) and "rotate" in str(e.value) and "zoom_crop" in str(e.value)
    with pytest.raises(ValueError):
        list_perturbations("sideways")


def test_kinds_partition_the_registry():
    pres, rem = list_perturbations("preserving"), list_perturbations("removing")
    assert sorted(pres + rem) == ENTRIES and not set(pres) & set(rem)
    assert {"color_jitter", "perspective", "rotate", "gaussian_blur", "jpeg", "translate_scale"} <= set(pres)
    assert {"occlusion_noise", "zoom_crop", "patch_blackout", "grey_fill", "occlusion_mean"} <= set(rem)


def test_register_a_new_entry_and_a_variant():
    from dataclasses import dataclass

    @register_perturbation
    @dataclass(frozen=True)
    class Invert(Perturbation):
        name: str = "test_invert"
        kind: str = "removing"

        def sample(self, rng_or_seed, width, height):
            return {}

        def apply_numpy(self, img, params):
            return 255 - img

        def apply_tensor(self, x, params):
            return 1.0 - x

    try:
        assert "test_invert" in list_perturbations("removing")
        assert get_perturbation("test_invert")(np.zeros((2, 2, 3), np.uint8), 0).max() == 255
        with pytest.raises(ValueError, match="already registered"):
            register_perturbation(Invert)
        register_perturbation(get_perturbation("rotate").with_options(max_degrees=2.0), name="test_rotate2")
        assert abs(get_perturbation("test_rotate2").sample(0, 9, 9)["angle"]) <= 2.0
        with pytest.raises(ValueError, match="kind"):
            Invert(kind="sideways")
    finally:
        PERTURBATIONS.unregister("test_invert")
        PERTURBATIONS.unregister("test_rotate2")
