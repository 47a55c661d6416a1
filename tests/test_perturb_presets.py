"""Presets: the paper preset's ranges against docs/method.md §1, draw/replay, YAML, PAPO's grid."""

import itertools
import json

import numpy as np
import pytest
import torch

from cppo.perturb import (
    Preset,
    UnknownNameError,
    get_perturbation,
    get_preset,
    list_presets,
    load_preset,
    preset_from_dict,
)
from cppo.perturb.occlusion import _pixel_boxes

torch.set_num_threads(1)
N = 2000  # draws per range check: a uniform's min/max land within ~0.1 % of its bounds


def _draws(name, n=N, w=200, h=100):
    rng = np.random.default_rng(123)
    return [get_perturbation(name).sample(rng, w, h) for _ in range(n)]


def _spread(values, lo, hi):
    v = np.asarray(values)
    span = hi - lo
    assert v.min() >= lo and v.max() <= hi  # within the bounds
    assert v.min() < lo + 0.01 * span and v.max() > hi - 0.01 * span  # reaching both ends
    assert abs(v.mean() - (lo + hi) / 2) < 0.03 * span  # and uniform-looking in between


def test_paper_preset_is_method_section_1():
    p = get_preset("paper")
    assert [e.name for e in p.preserving] == ["color_jitter", "perspective", "rotate"]
    assert [e.name for e in p.removing] == ["occlusion_noise", "zoom_crop"]
    assert {"paper", "papo", "in_distribution"} <= set(list_presets())


def test_color_jitter_ranges():
    d = _draws("color_jitter")
    _spread([x["brightness"] for x in d], 0.2, 1.3)
    _spread([x["contrast"] for x in d], 0.2, 1.8)
    _spread([x["saturation"] for x in d], 0.2, 1.8)
    assert "hue" not in d[0]  # hue untouched
    orders = {tuple(x["order"]) for x in d}
    assert orders == set(itertools.permutations(range(3)))  # random order, all six seen


def test_color_jitter_factors_mean_what_they_say():
    img = np.full((4, 4, 3), (100, 150, 50), np.uint8)
    cj = get_perturbation("color_jitter")
    out = cj.apply(img, {"brightness": 0.5, "contrast": 1.0, "saturation": 1.0, "order": [0, 1, 2]})
    assert out[0, 0].tolist() == [50, 75, 25]  # brightness multiplies
    out = cj.apply(img, {"brightness": 1.0, "contrast": 1.0, "saturation": 0.0, "order": [2, 0, 1]})
    # saturation 0: grey at the luma, 0.299·100 + 0.587·150 + 0.114·50 ≈ 124
    assert np.ptp(out[0, 0].astype(int)) <= 1
    assert abs(int(out[0, 0, 0]) - 124) <= 1


def test_perspective_probability_and_scale():
    d = _draws("perspective")
    rate = np.mean([not x["applied"] for x in d])
    assert 0.46 < rate < 0.54  # p = 0.5; the std of the rate over 2000 draws is 0.011
    offs = np.array([x["offsets"] for x in d if x["applied"]])  # (n, 4 corners, xy)
    _spread(offs.ravel(), 0.0, 0.1)  # distortion scale 0.2: each corner moves ≤ 0.2/2 of W, H
    # the identity draw leaves the image untouched; an applied one moves the corners inward
    img = np.full((40, 60, 3), 200, np.uint8)
    assert np.array_equal(get_perturbation("perspective").apply(img, {"applied": False, "offsets": []}), img)
    out = get_perturbation("perspective").apply(img, {"applied": True, "offsets": [[0.1, 0.1]] * 4})
    assert out[0, 0].tolist() == [0, 0, 0] and out[20, 30].tolist() == [200, 200, 200]  # black fill


def test_rotation_range_and_canvas():
    _spread([x["angle"] for x in _draws("rotate")], -10.0, 10.0)
    img = np.full((50, 80, 3), 255, np.uint8)
    out = get_perturbation("rotate").apply(img, {"angle": 10.0})
    assert out.shape == img.shape and out[0, 0].tolist() == [0, 0, 0]  # same canvas, black corners
    # counter-clockwise: a mark right of the centre moves up
    img = np.zeros((81, 81, 3), np.uint8)
    img[38:43, 70:75] = 255
    ys, _ = np.nonzero(get_perturbation("rotate").apply(img, {"angle": 10.0})[..., 0] > 128)
    assert ys.mean() < 40 - 4


def test_occlusion_boxes_and_coverage():
    d = _draws("occlusion_noise", n=300)
    boxes = np.array([x["boxes"] for x in d])  # (draws, 50, [x, y, w, h])
    assert boxes.shape[1:] == (50, 4)
    _spread(boxes[..., 2].ravel(), 0.05, 0.15)
    _spread(boxes[..., 3].ravel(), 0.05, 0.15)
    assert (boxes[..., 0] + boxes[..., 2] <= 1).all() and (boxes[..., 1] + boxes[..., 3] <= 1).all()
    cover = []
    for x in d[:100]:
        m = np.zeros((100, 200), bool)
        for x0, y0, pw, ph in _pixel_boxes(x["boxes"], 200, 100):
            m[y0 : y0 + ph, x0 : x0 + pw] = True
        cover.append(m.mean())
    assert 0.34 < np.mean(cover) < 0.44  # docs/method.md: ≈ 39 % of the area
    # the patches are uniform RGB noise: all 256 levels, mean ≈ 127.5
    out = get_perturbation("occlusion_noise")(np.zeros((100, 200, 3), np.uint8), 0)
    noise = out[out.sum(-1) > 0]
    assert len(np.unique(noise)) == 256 and abs(noise.mean() - 127.5) < 3


def test_zoom_crop_window_is_uniform_over_every_position_that_fits():
    # the official RandomZoomCrop (vbdi/cppo verl/recipe/cppo/cppo_dataset.py): side int(s·W) with
    # s ~ U(0.6, 0.7), left = randint(0, W - int(s·W)), top = randint(0, H - int(s·H))
    d = _draws("zoom_crop", n=20_000)
    _spread([x["scale"] for x in d], 0.6, 0.7)
    zc = get_perturbation("zoom_crop")
    boxes = np.array([zc.box(x, 200, 100) for x in d])  # (n, 4): x0, y0, cw, ch
    x0, y0, cw, ch = boxes.T
    assert (cw == (np.array([x["scale"] for x in d]) * 200).astype(int)).all()  # int(), as the official
    room_x, room_y = 200 - cw, 100 - ch
    assert (x0 >= 0).all() and (x0 <= room_x).all() and (y0 >= 0).all() and (y0 <= room_y).all()
    # the position over the free room: uniform, both ends reached (corners are only 2 of ~70 values)
    for pos, room in ((x0, room_x), (y0, room_y)):
        _spread(pos / room, 0.0, 1.0)
        assert (pos == 0).any() and (pos == room).any()
        at_edge = np.mean((pos == 0) | (pos == room))
        assert at_edge < 0.1  # ≈ 2 / (room + 1): 2/71 to 2/81 on the x axis, 2/31 to 2/41 on y
    # a corner crop always cuts two whole edge bands; this window is strictly inside on both axes,
    # cutting a part of all four edges, in ≈ (70/72)·(35/37) ≈ 0.92 of the draws
    interior = (x0 > 0) & (x0 < room_x) & (y0 > 0) & (y0 < room_y)
    assert 0.85 < interior.mean() < 0.97
    # a fixed window crops and stretches exactly there (R = x, G = y)
    yy, xx = np.mgrid[0:100, 0:200]
    img = np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)
    params = {"scale": 0.65, "left": 0.5, "top": 0.25}  # 130 × 65; x0 = 0.5·71 -> 35, y0 = 0.25·36 -> 9
    assert zc.box(params, 200, 100) == (35, 9, 130, 65)
    out = zc.apply(img, params)
    assert abs(int(out[0, 0, 0]) - 35) <= 1 and abs(int(out[0, 0, 1]) - 9) <= 1
    assert abs(int(out[-1, -1, 0]) - 164) <= 1 and abs(int(out[-1, -1, 1]) - 73) <= 1
    # left, top near 1 reach the last position (bottom-right corner), and the draw replays on another size
    assert zc.box({"scale": 0.65, "left": 0.9999, "top": 0.9999}, 200, 100) == (70, 35, 130, 65)
    assert zc.box(params, 400, 200) == (70, 17, 260, 130)  # 0.5·141 -> 70, 0.25·71 -> 17


def test_patch_blackout_is_papo_grid():
    p = get_preset("papo")
    assert [e.name for e in p.entries] == ["identity", "patch_blackout"]
    img = np.full((60, 75, 3), 180, np.uint8)  # 5 × 6 cells of 14 px, the last ones partial
    fracs = []
    for seed in range(200):
        out = get_perturbation("patch_blackout")(img, seed)
        black = out[..., 0] == 0
        for r in range(0, 60, 14):
            for c in range(0, 75, 14):
                cell = black[r : r + 14, c : c + 14]
                assert cell.all() or not cell.any()  # whole cells, aligned to the 14-px grid
        fracs.append(black[:56, :70].mean())
    assert abs(np.mean(fracs) - 0.6) < 0.02  # p = 0.6
    params = get_perturbation("patch_blackout").sample(0, 75, 60)
    with pytest.raises(ValueError, match="grid"):
        get_perturbation("patch_blackout").apply(np.zeros((30, 30, 3), np.uint8), params)


def test_draw_and_replay():
    preset = get_preset("paper")
    img = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    pos, neg, record = preset.draw(img, seed=11)
    record = json.loads(json.dumps(record))  # JSON-serialisable, and replays after the round trip
    assert record["preset"] == "paper" and record["seed"] == 11
    assert record["positive"]["name"] in {"color_jitter", "perspective", "rotate"}
    assert record["negative"]["name"] in {"occlusion_noise", "zoom_crop"}
    p2, n2 = preset.replay(img, record)
    np.testing.assert_array_equal(p2, pos)
    np.testing.assert_array_equal(n2, neg)
    p3, n3, r3 = preset.draw(img, seed=11)
    assert r3 == record and np.array_equal(p3, pos) and np.array_equal(n3, neg)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    tp, tn, trec = preset.draw(x, seed=11)
    assert trec == record and tp.shape == x.shape and tn.shape == x.shape


def test_one_of_each_kind_uniformly():
    preset = get_preset("paper")
    recs = [preset.sample(s, 32, 32) for s in range(900)]
    pos = [r["positive"]["name"] for r in recs]
    neg = [r["negative"]["name"] for r in recs]
    for name in ("color_jitter", "perspective", "rotate"):
        assert 0.28 < pos.count(name) / 900 < 0.39
    assert 0.45 < neg.count("zoom_crop") / 900 < 0.55


def test_draw_view_draws_one_kind_and_replays():
    preset = get_preset("paper")
    img = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    neg, record = preset.draw_view(img, 5)
    record = json.loads(json.dumps(record))
    assert set(record) == {"name", "params"} and record["name"] in {"occlusion_noise", "zoom_crop"}
    np.testing.assert_array_equal(preset.replay_view(img, record), neg)
    # the choice, then the entry's parameters, from one generator: what the detector relies on
    rng = np.random.default_rng(5)
    entry = preset.removing[int(rng.integers(2))]
    assert record == {"name": entry.name, "params": json.loads(json.dumps(entry.sample(rng, 64, 48)))}
    names = [preset.sample_view("removing", s, 32, 32)["name"] for s in range(600)]
    assert 0.43 < names.count("zoom_crop") / 600 < 0.57
    pos, _ = preset.draw_view(img, 5, kind="preserving")
    assert pos.shape == img.shape
    with pytest.raises(ValueError, match="kind must be"):
        preset.sample_view("both", 0, 32, 32)


YAML = """
name: test_gentle
description: from a file
preserving:
  - color_jitter
  - {entry: rotate, name: rotate5, max_degrees: 5}
removing:
  - occlusion_mean
  - {entry: occlusion_noise, n_patches: 3, size: [0.2, 0.3]}
"""


def test_yaml_preset(tmp_path):
    path = tmp_path / "gentle.yaml"
    path.write_text(YAML)
    preset = load_preset(path)
    assert [e.name for e in preset.preserving] == ["color_jitter", "rotate5"]
    assert preset.entry("rotate5").max_degrees == 5
    variant = preset.removing[1]
    assert variant.n_patches == 3 and variant.size == (0.2, 0.3)
    assert variant.name.startswith("occlusion_noise[")
    recs = [preset.sample(s, 40, 40) for s in range(200)]
    angles = [r["positive"]["params"]["angle"] for r in recs if r["positive"]["name"] == "rotate5"]
    assert angles and max(abs(a) for a in angles) <= 5
    img = np.full((40, 40, 3), 90, np.uint8)
    pos, neg, rec = preset.draw(img, 4)
    assert np.array_equal(preset.replay(img, rec)[1], neg)
    assert get_preset(str(path)).name == "test_gentle"  # a path works wherever a name does
    again = preset_from_dict(preset.to_dict())  # and a preset writes itself back out
    assert again == preset


def test_python_preset_and_errors():
    p = Preset("test_py", ("gaussian_blur", get_perturbation("jpeg")), ("grey_fill",))
    assert [e.name for e in p.entries] == ["gaussian_blur", "jpeg", "grey_fill"]
    with pytest.raises(UnknownNameError, match="valid names: .*paper"):
        get_preset("papper")
    with pytest.raises(UnknownNameError, match="rotate"):
        preset_from_dict({"name": "x", "preserving": ["rotat"], "removing": ["grey_fill"]})
    with pytest.raises(ValueError, match="not"):
        Preset("x", ("grey_fill",), ("zoom_crop",))  # a removing entry listed as preserving
    with pytest.raises(ValueError, match="at least one"):
        Preset("x", (), ("zoom_crop",))
    with pytest.raises(ValueError, match="unknown preset keys"):
        preset_from_dict({"name": "x", "preserving": ["rotate"], "removing": ["grey_fill"], "hue": 1})
    with pytest.raises(ValueError, match="unknown options"):
        bad = {"name": "x", "preserving": [{"entry": "rotate", "deg": 3}], "removing": ["grey_fill"]}
        preset_from_dict(bad)
    with pytest.raises(UnknownNameError):
        get_preset("paper").replay(
            np.zeros((4, 4, 3), np.uint8), {"positive": {"name": "jpeg", "params": {}}, "negative": {}}
        )
