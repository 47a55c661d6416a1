"""cppo-perturb end to end: the gallery, per-entry images and params.json; bad input writes nothing."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cli.perturb import main
from cppo.perturb import get_perturbation, get_preset
from cppo.perturb.gallery import sample_image

torch.set_num_threads(1)


def test_default_run_on_the_bundled_sample(tmp_path):
    out = tmp_path / "g"
    assert main(["--out", str(out), "--seed", "3"]) == 0
    meta = json.loads((out / "params.json").read_text())
    preset = get_preset("paper")
    assert set(meta["entries"]) == {e.name for e in preset.entries} and meta["seed"] == 3
    img = sample_image()
    for name, e in meta["entries"].items():
        saved = np.asarray(Image.open(out / e["file"]))
        # each tile is exactly the entry applied with the recorded params, and with the seed
        np.testing.assert_array_equal(saved, np.asarray(get_perturbation(name).apply(img, e["params"])))
        np.testing.assert_array_equal(saved, np.asarray(get_perturbation(name)(img, 3)))
    pos, neg = preset.replay(img, meta["draw"])
    np.testing.assert_array_equal(np.asarray(Image.open(out / "positive.png")), np.asarray(pos))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "negative.png")), np.asarray(neg))
    gallery = Image.open(out / "gallery.png")
    assert gallery.width >= 4 * 200 and gallery.height >= 2 * 200  # original + 5 entries, 4 per row
    assert not any(p.name.startswith(".cppo-perturb-") for p in tmp_path.iterdir())  # temp dir gone


def test_user_image_and_yaml_preset(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (30, 41, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in.png")
    yaml = "name: mine\npreserving: [gaussian_blur]\nremoving: [grey_fill, patch_blackout]\n"
    (tmp_path / "p.yaml").write_text(yaml)
    out = tmp_path / "o"
    rc = main(["--image", str(tmp_path / "in.png"), "--preset", str(tmp_path / "p.yaml"), "--out", str(out)])
    assert rc == 0
    assert Image.open(out / "grey_fill.png").size == (41, 30)
    assert json.loads((out / "params.json").read_text())["preset"]["name"] == "mine"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "does/not/exist.png"], "does/not/exist.png"),
        (["--image", "CORRUPT"], "cannot read image"),
        (["--preset", "no_such_preset"], "no_such_preset"),
    ],
)
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, capsys, args, message):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    args = [str(tmp_path / "bad.png") if a == "CORRUPT" else a for a in args]
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.png"]


@pytest.mark.slow
def test_console_entry_in_a_subprocess(tmp_path):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "cli.perturb", "--preset", "papo", "--seed", "1", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert {"gallery.png", "params.json", "identity.png", "patch_blackout.png"} <= set(os.listdir(out))


def test_a_gallery_never_has_more_columns_than_views():
    """--columns 100000 once built a 25-million-pixel-wide blank sheet (and took minutes)."""
    from cppo.perturb.gallery import contact_sheet

    tiles = [(f"view {i}", Image.new("RGB", (20, 20), (i * 40, 0, 0))) for i in range(3)]
    assert contact_sheet(tiles, columns=100_000, tile=32).width == 3 * 32
    assert contact_sheet(tiles, columns=2, tile=32).width == 2 * 32
