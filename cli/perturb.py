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
    """(RGB image, where it came from); ImageError (a ValueError) with a one-line reason."""
    from cppo.perturb import load_image
    from cppo.perturb.gallery import sample_image

    if path is None:
        return sample_image(), "bundled sample (astronaut)"
    return load_image(path), path


def _check_out(out: Path) -> None:
    """Refuse, before any work, an --out that is a file or cannot be written (one line)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=".cppo-perturb-probe-", dir=out.parent))
        probe.rmdir()
        if out.is_dir():
            (out / ".cppo-perturb-probe").touch()
            (out / ".cppo-perturb-probe").unlink()
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written: {e.strerror or e}") from None


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

    if args.columns < 1:
        return _fail(f"--columns must be >= 1, got {args.columns}")
    if args.seed < 0:
        return _fail(f"--seed must be >= 0, got {args.seed}")
    if not args.out.strip():
        return _fail("--out is empty: give an output directory")
    try:
        preset = get_preset(args.preset)
    except (UnknownNameError, ValueError, TypeError, OSError) as e:
        return _fail(f"bad preset {args.preset!r}: {e}")
    try:
        image, source = _load_image(args.image)
        out = Path(args.out)
        _check_out(out)
    except ValueError as e:
        return _fail(str(e))

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

    # Everything is written to a temporary sibling first, then renamed into --out: a full disk or a
    # read-only folder fails before --out changes, with one line.
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".cppo-perturb-", dir=out.parent))
        for fname, img in files.items():
            img.save(tmp / fname)
        (tmp / "params.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    except OSError as e:
        return _fail(f"cannot write {out}: {e.strerror or e} (nothing was changed there)")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"cppo-perturb: {len(preset.entries)} views of {source} ({preset.name}, seed {args.seed}) -> "
        f"{out / 'gallery.png'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
