"""Does a view keep the scene's information? A classical oracle reads synthetic scenes before
and after each perturbation, and we count how often its answer survives.

Scenes: 3–6 circles and squares in saturated red, green, blue or yellow on a plain light grey
background, 112×112 (the tiny-VLM shapes task's size), never touching, with a unique leftmost
shape. The oracle classifies pixels by hue (saturation ≥ 0.35, value ≥ 0.25, hue within 25° of
a palette colour), opens each colour mask with a 3×3 square, and counts connected components
(scipy.ndimage) of at least 0.25 % of the image. Questions:

    counts    the number of shapes of every colour (all four must match)
    total     the number of shapes
    leftmost  the colour of the shape whose centroid is leftmost

A survival rate is the share of draws in which the oracle's answer on the view equals its answer
on the clean scene (which equals the ground truth on every scene; tests check it). The oracle
is a stand-in for perception with fixed thresholds: an entry that moves colours out of its hue
or saturation bands "loses" colour answers for the oracle even where a person would still read
them. The table says so rather than tuning the oracle to each view.

    python -m cppo.perturb.information --draws 200      # the table in docs/perturbations.md
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from cppo.perturb.base import Perturbation, get_perturbation, list_perturbations

PALETTE = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 70, 220), "yellow": (230, 200, 20)}
HUES = {"red": 0.0, "green": 124.0, "blue": 229.0, "yellow": 52.0}  # degrees, of PALETTE
BACKGROUND = (205, 205, 205)
QUESTIONS = ("counts", "total", "leftmost")


@dataclass(frozen=True)
class Reading:
    counts: tuple[tuple[str, int], ...]  # ((colour, n), ...) in PALETTE order
    leftmost: str | None

    @property
    def total(self) -> int:
        return sum(n for _, n in self.counts)

    def answer(self, question: str):
        return getattr(self, question)


def make_scene(seed: int, size: int = 112) -> tuple[np.ndarray, Reading]:
    """(H, W, 3) uint8 scene and its ground truth, a pure function of the seed."""
    rng = np.random.default_rng(seed)
    while True:
        n = int(rng.integers(3, 7))
        shapes = []  # (colour, kind, cx, cy, r)
        for _ in range(200):
            if len(shapes) == n:
                break
            r = int(rng.integers(7, 13))
            cx, cy = (int(v) for v in rng.integers(r + 3, size - r - 3, size=2))
            # squares reach r·√2 at the corners: keep 6 px of air between bounding circles
            if all(np.hypot(cx - s[2], cy - s[3]) > 1.42 * (r + s[4]) + 6 for s in shapes):
                colour = list(PALETTE)[int(rng.integers(4))]
                shapes.append((colour, "circle" if rng.random() < 0.5 else "square", cx, cy, r))
        xs = sorted(s[2] for s in shapes)
        if len(shapes) == n and xs[1] - xs[0] >= 8:  # a unique leftmost shape
            break
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for colour, kind, cx, cy, r in shapes:
        box = (cx - r, cy - r, cx + r, cy + r)
        (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=PALETTE[colour])
    counts = tuple((c, sum(s[0] == c for s in shapes)) for c in PALETTE)
    return np.asarray(img), Reading(counts, min(shapes, key=lambda s: s[2])[0])


def colour_masks(img: np.ndarray) -> dict[str, np.ndarray]:
    """(H, W, 3) uint8 -> {colour: (H, W) bool} by hue band, saturation and value thresholds."""
    rgb = img.astype(np.float32) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-6), 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    d = np.maximum(delta, 1e-6)
    hue = np.select([mx == r, mx == g], [((g - b) / d) % 6, (b - r) / d + 2], (r - g) / d + 4) * 60.0
    coloured = (sat >= 0.35) & (mx >= 0.25)
    out = {}
    for name, h in HUES.items():
        dist = np.abs((hue - h + 180.0) % 360.0 - 180.0)
        out[name] = coloured & (dist <= 25.0)
    return out


def read_scene(img: np.ndarray) -> Reading:
    """The oracle: per-colour connected components of the opened colour masks, big enough."""
    h, w = img.shape[:2]
    min_area = 0.0025 * h * w
    counts, lefts = [], []
    for name, mask in colour_masks(img).items():
        mask = ndimage.binary_opening(mask, structure=np.ones((3, 3), bool))
        labels, n = ndimage.label(mask)
        if n == 0:
            counts.append((name, 0))
            continue
        idx = np.arange(1, n + 1)
        areas = ndimage.sum_labels(np.ones_like(labels), labels, idx)
        keep = idx[areas >= min_area]
        counts.append((name, len(keep)))
        for _, cx in ndimage.center_of_mass(mask, labels, keep) if len(keep) else []:
            lefts.append((cx, name))
    return Reading(tuple(counts), min(lefts)[1] if lefts else None)


def survival(entry: Perturbation, draws: int = 200, size: int = 112) -> dict[str, float]:
    """{question: share of draws whose oracle answer on the view equals the clean answer}.

    Draw i uses scene seed i and perturbation seed 10_000 + i (numpy path)."""
    kept = dict.fromkeys(QUESTIONS, 0)
    for i in range(draws):
        img, _ = make_scene(i, size)
        clean = read_scene(img)
        view = read_scene(entry(img, 10_000 + i))
        for q in QUESTIONS:
            kept[q] += clean.answer(q) == view.answer(q)
    return {q: kept[q] / draws for q in QUESTIONS}


def table(names: list[str], draws: int) -> str:
    rows = ["| entry | kind | counts kept | total kept | leftmost kept |", "|---|---|---|---|---|"]
    for name in names:
        e = get_perturbation(name)
        r = survival(e, draws)
        rows.append(f"| `{name}` | {e.kind} | " + " | ".join(f"{r[q]:.0%}" for q in QUESTIONS) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=200, help="scenes (one draw each) per entry")
    ap.add_argument("--entries", nargs="*", default=None, help="default: every registered entry")
    args = ap.parse_args(argv)
    names = args.entries or sorted(list_perturbations(), key=lambda n: (get_perturbation(n).kind, n))
    print(table(names, args.draws))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
