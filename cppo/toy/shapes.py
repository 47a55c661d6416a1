"""A synthetic visual-reasoning task: small images of coloured shapes with questions about them.

Every question needs the image: the question names colours and shapes, but how many there are,
which colour the square is, which of two shapes is further left, and whether one colour
outnumbers another is only in the pixels. Shapes are drawn without anti-aliasing on a plain
background and never touch (a gap of at least `GAP` pixels), so each shape is one connected
region of one exact colour: the tests recover every answer from the rendered image alone
(scipy.ndimage connected components), never from the generator's own bookkeeping.

Letters: H, W pixels (square images, H = W = `image_size`).

Question types. Answers are balanced by construction (the answer is drawn first, uniformly, and
a scene that cannot give it is redrawn), so chance, the accuracy of the best image-blind
predictor, is one over the number of answers:
- ``count_color``: "How many red shapes are there?" -> "0" .. "3"; chance 25 %.
- ``color_of_shape``: "What color is the square?" (exactly one square in the scene) -> a colour;
  chance 25 %.
- ``further_left``: "Which is further left, the red circle or the blue square?" (both unique in
  the scene, centres at least `LEFT_MARGIN` px apart) -> "red circle"; chance 50 %.
- ``more_than``: "Are there more red shapes than blue shapes?" (the counts differ) -> "yes" /
  "no"; chance 50 %.

Overall chance with the four types drawn uniformly: (25 + 25 + 50 + 50) / 4 = 37.5 %.

A perception-limited variant: ``contrast`` c in (0, 1] draws every colour at c times its distance
from the white background (c = 0.25: red (220, 40, 40) becomes (246, 201, 201)). Rendering draws no
random numbers, so a seed gives the same scenes, questions and answers at every contrast: the chance
rates above hold unchanged, and a model trained at full contrast can be tested on the faint images
of the same test items (a test-time shift): ``python -m cppo.toy --out data/faint --contrast 0.25``.

Each item also carries `reasoning`: the one-sentence think text of the warm start, which names
the scene content that decides the answer.

The reasoning sentences are written here and read back here (`answer_from_reasoning`,
`reasoning_agrees`), so that the two change together.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
QUESTION_TYPES: tuple[str, ...] = ("count_color", "color_of_shape", "further_left", "more_than")
CHANCE: dict[str, float] = {
    "count_color": 0.25,
    "color_of_shape": 0.25,
    "further_left": 0.5,
    "more_than": 0.5,
}
DEFAULT_IMAGE_SIZE = 112  # 8 x 8 patches of 14 px, merged 2 x 2: 16 image tokens
MIN_SHAPES, MAX_SHAPES = 2, 5
GAP = 3  # pixels between the bounding boxes of any two shapes
LEFT_MARGIN = 8  # pixels between the centres of the two shapes a further_left question compares
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Shape:
    """One shape: kind, colour name, centre (x, y) and half-size r in pixels (bbox = centre ± r)."""

    kind: str
    color: str
    x: int
    y: int
    r: int


@dataclass(frozen=True)
class Scene:
    image_size: int
    shapes: tuple[Shape, ...]

    def count(self, color: str | None = None, kind: str | None = None) -> int:
        return sum(
            (color is None or s.color == color) and (kind is None or s.kind == kind) for s in self.shapes
        )


@dataclass
class ShapesItem:
    image: Image.Image  # RGB, image_size x image_size
    question: str
    answer: str
    question_type: str
    scene: Scene
    reasoning: str = field(default="")


def _size_range(image_size: int) -> tuple[int, int]:
    """Half-sizes scale with the image: 7..12 px at 112 px."""
    return max(3, round(image_size * 0.0625)), max(4, round(image_size * 0.107))


def make_scene(rng: np.random.Generator, image_size: int = DEFAULT_IMAGE_SIZE) -> Scene:
    """2..5 shapes of random kind, colour, size and position, bounding boxes at least GAP px apart."""
    n = int(rng.integers(MIN_SHAPES, MAX_SHAPES + 1))
    lo, hi = _size_range(image_size)
    shapes: list[Shape] = []
    while len(shapes) < n:
        for _ in range(200):  # rejection sampling; gives up on this shape if the image is full
            r = int(rng.integers(lo, hi + 1))
            x = int(rng.integers(r + 1, image_size - r - 1))
            y = int(rng.integers(r + 1, image_size - r - 1))
            if all(abs(x - s.x) > r + s.r + GAP or abs(y - s.y) > r + s.r + GAP for s in shapes):
                kind = SHAPES[int(rng.integers(len(SHAPES)))]
                color = list(COLORS)[int(rng.integers(len(COLORS)))]
                shapes.append(Shape(kind, color, x, y, r))
                break
        else:
            break
    return Scene(image_size, tuple(shapes))


def faint_colors(contrast: float = 1.0) -> dict[str, tuple[int, int, int]]:
    """Each colour at `contrast` times its distance from the background (1.0: `COLORS`), rounded;
    refuses a contrast at which two colours, or a colour and the background, become one."""
    if not 0 < contrast <= 1:
        raise ValueError(f"contrast must be in (0, 1] (1 = full colour), got {contrast}")
    faint = {}
    for name, rgb in COLORS.items():
        faint[name] = tuple(round(b + contrast * (c - b)) for c, b in zip(rgb, BACKGROUND))
    if len({*faint.values(), BACKGROUND}) != len(faint) + 1:
        raise ValueError(f"contrast {contrast} is too low: colours become indistinguishable after rounding")
    return faint


def render(scene: Scene, contrast: float = 1.0) -> Image.Image:
    """Draw the scene without anti-aliasing, so every shape pixel has its colour's exact RGB
    (``faint_colors(contrast)``)."""
    colors = faint_colors(contrast)
    img = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        box = (s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r)
        fill = colors[s.color]
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:  # upward triangle filling the box
            draw.polygon([(s.x, s.y - s.r), (s.x + s.r, s.y + s.r), (s.x - s.r, s.y + s.r)], fill=fill)
    return img


def _plural(kind: str) -> str:
    return kind + "s"


def _ask(rng: np.random.Generator, scene: Scene, qtype: str, count: int) -> tuple[str, str, str] | None:
    """(question, answer, reasoning) of type `qtype` for the scene, or None when it does not apply.

    `count` is count_color's answer, drawn once per item by the caller so that redrawn scenes do
    not skew it.
    """
    colors = list(COLORS)
    if qtype == "count_color":
        k = count  # the answer first, uniform over 0..3, then a colour that has it
        with_k = [c for c in colors if scene.count(color=c) == k]
        if not with_k:
            return None
        c = with_k[int(rng.integers(len(with_k)))]
        return f"How many {c} shapes are there?", str(k), f"I see {k} {c} shapes."
    if qtype == "color_of_shape":
        kinds = [k for k in SHAPES if scene.count(kind=k) == 1]
        if not kinds:
            return None
        kind = kinds[int(rng.integers(len(kinds)))]
        shape = next(s for s in scene.shapes if s.kind == kind)
        return f"What color is the {kind}?", shape.color, f"The {kind} is {shape.color}."
    if qtype == "further_left":
        unique = [s for s in scene.shapes if scene.count(color=s.color, kind=s.kind) == 1]
        pairs = [
            (a, b) for i, a in enumerate(unique) for b in unique[i + 1 :] if abs(a.x - b.x) >= LEFT_MARGIN
        ]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        if rng.random() < 0.5:
            a, b = b, a  # the question's order says nothing about the answer
        name_a, name_b = f"{a.color} {a.kind}", f"{b.color} {b.kind}"
        side = "left" if a.x < b.x else "right"
        return (
            f"Which is further left, the {name_a} or the {name_b}?",
            name_a if side == "left" else name_b,
            # the two names in the question's order, so that the one word "left"/"right" decides
            f"The {name_a} is {side} of the {name_b}.",
        )
    if qtype == "more_than":
        pairs = [(a, b) for a in colors for b in colors if scene.count(color=a) > scene.count(color=b)]
        if not pairs:
            return None
        c1, c2 = pairs[int(rng.integers(len(pairs)))]  # c1 has more; ties are never asked
        if rng.random() < 0.5:
            c1, c2 = c2, c1  # yes and no equally often
        k1, k2 = scene.count(color=c1), scene.count(color=c2)
        return (
            f"Are there more {c1} shapes than {c2} shapes?",
            "yes" if k1 > k2 else "no",
            f"I see {k1} {c1} and {k2} {c2} shapes.",
        )
    raise ValueError(f"unknown question type {qtype!r}; valid: {', '.join(QUESTION_TYPES)}")


def make_item(
    rng: np.random.Generator,
    image_size: int = DEFAULT_IMAGE_SIZE,
    question_type: str | None = None,
    contrast: float = 1.0,
) -> ShapesItem:
    """One item; a uniformly drawn question type unless `question_type` is given; drawn at `contrast`.

    Scenes are redrawn until the question applies (e.g. color_of_shape needs exactly one square).
    """
    if question_type is not None and question_type not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {question_type!r}; valid: {', '.join(QUESTION_TYPES)}")
    qtype = question_type or QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    count = int(rng.integers(4))
    while True:
        scene = make_scene(rng, image_size)
        asked = _ask(rng, scene, qtype, count)
        if asked is not None:
            question, answer, reasoning = asked
            return ShapesItem(render(scene, contrast), question, answer, qtype, scene, reasoning)


def target_response(item: ShapesItem) -> str:
    """The warm-start target: docs/method.md §4's format with one sentence naming what decides the answer."""
    return f"<think>{item.reasoning}</think> \\boxed{{{item.answer}}}"


_REASONING = {
    "count_color": re.compile(r"I see (\d+) (\w+) shapes\."),
    "color_of_shape": re.compile(r"The (\w+) is (\w+)\."),
    "further_left": re.compile(r"The (\w+ \w+) is (left|right) of the (\w+ \w+)\."),
    "more_than": re.compile(r"I see (\d+) (\w+) and (\d+) (\w+) shapes\."),
}
_THINK = re.compile(r"<think>(.*?)</think>", re.S)


def further_left_names(question: str) -> tuple[str, str]:
    """The two shapes a further_left question names, in its order: "Which is further left, the red
    circle or the blue square?" -> ("red circle", "blue square")."""
    a, b = question.rstrip("?")[len("Which is further left, the ") :].split(" or the ")
    return a, b


def answer_from_reasoning(question_type: str, question: str, response: str) -> str | None:
    """The answer a response's reasoning sentence implies, or None when the sentence is not the
    well-formed sentence of its question type about the things the question names.

    "How many red shapes are there?" + "<think>I see 2 red shapes.</think> ..." -> "2";
    "Which is further left, the red circle or the blue square?" + "<think>The red circle is right of
    the blue square.</think>" -> "blue square"; a sentence about another colour or shape, or a
    more_than count that ties, gives None. The check that a model's reasoning and its boxed answer
    agree compares this with the boxed answer (`reasoning_agrees`).
    """
    think = _THINK.search(response)
    m = _REASONING[question_type].fullmatch(think.group(1).strip()) if think else None
    if m is None:
        return None
    words = question.rstrip("?").split()
    if question_type == "count_color":  # How many C shapes are there
        return m.group(1) if m.group(2) == words[2] else None
    if question_type == "color_of_shape":  # What color is the KIND
        return m.group(2) if m.group(1) == words[-1] and m.group(2) in COLORS else None
    if question_type == "further_left":  # Which is further left, the A or the B
        a, b = further_left_names(question)
        if (m.group(1), m.group(3)) != (a, b):  # the names in the question's order
            return None
        return a if m.group(2) == "left" else b
    k1, c1, k2, c2 = m.groups()  # Are there more C1 shapes than C2 shapes
    if (c1, c2) != (words[3], words[6]) or k1 == k2:
        return None
    return "yes" if int(k1) > int(k2) else "no"


def reasoning_agrees(question_type: str, question: str, response: str) -> bool:
    """The reasoning sentence is well-formed and implies exactly the last boxed answer."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", response)
    implied = answer_from_reasoning(question_type, question, response)
    return implied is not None and bool(boxed) and boxed[-1].strip() == implied


def _item_rng(seed: int, split: str, index: int, attempt: int = 0) -> np.random.Generator:
    # One generator per (seed, split, index): a split's first n items do not depend on n.
    return np.random.default_rng([seed, SPLITS.index(split), index, attempt])


def split_items(
    split: str,
    n: int,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    exclude: set | None = None,
    contrast: float = 1.0,
) -> list[ShapesItem]:
    """The first `n` items of a split, as `export_shapes_dataset` writes them (same seed, same items;
    `contrast` changes only how they are drawn).

    `exclude` holds scenes already used by another split; an item whose scene is in it is redrawn.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    items = []
    for i in range(n):
        attempt = 0
        while True:
            item = make_item(_item_rng(seed, split, i, attempt), image_size, contrast=contrast)
            if exclude is None or item.scene not in exclude:
                break
            attempt += 1
        items.append(item)
    return items


def export_shapes_dataset(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    contrast: float = 1.0,
) -> dict[str, Path]:
    """Write `out_dir/{train,val,test}/data.jsonl` and `images/NNNNNN.png`; return each split's jsonl.

    Each line is `{"image": "images/000001.png", "question", "answer", "question_type"}`, the image
    path relative to the jsonl's folder. The test split is drawn first and never changes with the
    sizes of the others; val and train redraw any scene already used by an earlier split, so the
    splits share no scene. `contrast` < 1 draws the same items fainter (the module docstring).
    """
    faint_colors(contrast)  # refuse a bad contrast before writing anything
    out = Path(out_dir)
    used: set[Scene] = set()
    paths = {}
    for split, n in (("test", n_test), ("val", n_val), ("train", n_train)):
        items = split_items(split, n, seed, image_size, exclude=used, contrast=contrast)
        used.update(it.scene for it in items)
        split_dir = out / split
        (split_dir / "images").mkdir(parents=True, exist_ok=True)
        with open(split_dir / "data.jsonl", "w") as f:
            for i, item in enumerate(items, start=1):
                rel = f"images/{i:06d}.png"
                item.image.save(split_dir / rel)
                row = {
                    "image": rel,
                    "question": item.question,
                    "answer": item.answer,
                    "question_type": item.question_type,
                }
                f.write(json.dumps(row) + "\n")
        paths[split] = split_dir / "data.jsonl"
    return {s: paths[s] for s in SPLITS}


def scene_dict(scene: Scene) -> dict:
    return asdict(scene)
