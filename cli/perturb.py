"""cppo-perturb: every view of a preset applied to one image, as a labelled gallery.

    cppo-perturb --out runs/perturb                                   # bundled sample, paper preset
    cppo-perturb --image cat.jpg --preset papo --seed 3 --out runs/cat
    cppo-perturb --preset my_views.yaml --out runs/mine               # a preset from YAML

Writes into --out: gallery.png (original + every entry of the preset, each labelled with its
name and key parameters), original.png, one PNG per entry, positive.png / negative.png (the
preset's own draw for this seed, what training would see) and params.json (every entry's
params, the draw's record, the preset). Each entry's tile equals
`get_perturbation(name)(image, seed)`. Bad input prints one line and exits 2 before anything is
written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path


def _fail(msg: str) -> int:
    print(f"cppo-perturb: {msg}", file=sys.stderr)
    return 2


def _load_image(path: str | None):
    from PIL import Image, UnidentifiedImageError

    from cppo.perturb.gallery import sample_image
    from cppo.perturb.image import to_rgb

    if path is None:
        return sample_image(), "bundled sample (astronaut)"
    if not Path(path).is_file():
        raise ValueError(f"no such image file: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img), path
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="cppo-perturb", description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", default=None, help="image file (default: the bundled sample)")
    ap.add_argument("--preset", default="paper", help="registered preset name or a .yaml file")
    ap.add_argument("--seed", type=int, default=0, help="seed of every entry's draw")
    ap.add_argument("--out", default="runs/perturb", help="output directory")
    ap.add_argument("--columns", type=int, default=4, help="gallery columns")
    args = ap.parse_args(argv)

    from cppo.perturb import UnknownNameError, get_preset
    from cppo.perturb.gallery import contact_sheet

    try:
        preset = get_preset(args.preset)
    except (UnknownNameError, ValueError, TypeError, OSError) as e:
        return _fail(f"bad preset {args.preset!r}: {e}")
    try:
        image, source = _load_image(args.image)
    except ValueError as e:
        return _fail(str(e))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _fail(f"--out {out} exists and is not a directory")

    # everything is computed before anything is written
    w, h = image.size
    files = {"original.png": image}
    tiles = [(f"original {w}x{h}", image)]
    entries = {}
    for e in preset.entries:
        params = e.sample(args.seed, w, h)
        view = e.apply(image, params)
        fname = f"{_safe(e.name)}.png"
        files[fname] = view
        tiles.append((f"{e.kind[0].upper()}: {e.name}  {e.summary(params)}", view))
        entries[e.name] = {"kind": e.kind, "file": fname, "params": params}
    pos, neg, record = preset.draw(image, args.seed)
    files["positive.png"], files["negative.png"] = pos, neg
    files["gallery.png"] = contact_sheet(tiles, columns=args.columns)
    meta = {
        "image": source,
        "width": w,
        "height": h,
        "seed": args.seed,
        "preset": preset.to_dict(),
        "entries": entries,
        "draw": record,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".cppo-perturb-", dir=out.parent))
    try:
        for fname, img in files.items():
            img.save(tmp / fname)
        (tmp / "params.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"cppo-perturb: {len(preset.entries)} views of {source} ({preset.name}, seed {args.seed}) -> "
        f"{out / 'gallery.png'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
