"""Images per second of every perturbation entry on 512×512 images (sample + apply).

    python bench/bench_perturb.py                    # CPU: numpy path and kornia batch path
    python bench/bench_perturb.py --threads 2 --batch 16 --seconds 1.0

Paths timed, each including `sample` (one draw per image on the numpy path, one per batch on
the tensor path, as `Preset.draw` does):
    numpy    PIL/numpy input, albumentations/OpenCV, one (512, 512, 3) uint8 image at a time
    cpu      kornia on a (B, 3, 512, 512) float32 batch on the CPU
    cuda     the same batch on the GPU (only when one is present; synchronised)
Prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cppo.perturb import get_perturbation, list_perturbations  # noqa: E402
from cppo.perturb.gallery import sample_image  # noqa: E402

SIZE = 512


def _rate(fn, n_images: int, seconds: float, sync=lambda: None) -> float:
    fn()  # warm-up (kernels, caches)
    sync()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        sync()
        dt = time.perf_counter() - t0
        if dt >= seconds and reps >= 3:
            return reps * n_images / dt


def bench(names: list[str], batch: int, seconds: float) -> list[dict]:
    img = np.asarray(sample_image().resize((SIZE, SIZE)))  # (512, 512, 3) uint8
    x = torch.from_numpy(img.copy()).permute(2, 0, 1).float().div(255).repeat(batch, 1, 1, 1)  # (B, 3, H, W)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for name in names:
        p = get_perturbation(name)
        rng = np.random.default_rng(0)
        row = {
            "entry": name,
            "kind": p.kind,
            "numpy": _rate(lambda p=p, r=rng: p.apply(img, p.sample(r, SIZE, SIZE)), 1, seconds),
        }
        for dev in devices:
            xd = x.to(dev)
            sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
            step = lambda p=p, xd=xd, r=rng: p.apply(xd, p.sample(r, SIZE, SIZE))  # noqa: E731
            row[dev] = _rate(step, batch, seconds, sync)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch and OpenCV threads")
    ap.add_argument("--batch", type=int, default=16, help="tensor batch size")
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum timing per cell")
    ap.add_argument("--entries", nargs="*", default=None, help="default: every registered entry")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import cv2

    cv2.setNumThreads(args.threads)
    names = args.entries or sorted(list_perturbations(), key=lambda n: (get_perturbation(n).kind, n))
    rows = bench(names, args.batch, args.seconds)
    cols = ["numpy", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    heads = {
        "numpy": "numpy/PIL, 1 image",
        "cpu": f"kornia CPU, batch {args.batch}",
        "cuda": f"kornia CUDA, batch {args.batch}",
    }
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    print(
        f"images/s at {SIZE}x{SIZE}, sample + apply; {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, torch {torch.__version__}{gpu}\n"
    )
    print("| entry | kind | " + " | ".join(heads[c] for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| `{r['entry']}` | {r['kind']} | " + " | ".join(f"{r[c]:,.0f}" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
