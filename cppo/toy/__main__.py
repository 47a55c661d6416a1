"""Export the shapes task as a dataset folder.

    python -m cppo.toy --out data/shapes --n-train 2000 --n-val 200 --n-test 400 --seed 0
    python -m cppo.toy --out data/faint --contrast 0.25     # the same items, drawn fainter
"""

from __future__ import annotations

import argparse
import sys

from cppo.toy.shapes import DEFAULT_IMAGE_SIZE, export_shapes_dataset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Export the shapes task: {train,val,test}/data.jsonl + images.")
    ap.add_argument("--out", required=True, help="dataset folder to write")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    ap.add_argument(
        "--contrast",
        type=float,
        default=1.0,
        help="draw the same items fainter: each colour at this fraction of its distance from white (0, 1]",
    )
    args = ap.parse_args(argv)
    try:
        paths = export_shapes_dataset(
            args.out, args.n_train, args.n_val, args.n_test, args.seed, args.image_size, args.contrast
        )
    except ValueError as e:
        ap.error(str(e))
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
