#!/usr/bin/env bash
# Sets everything up (./.venv, pinned CPU torch, cppo) and runs the main job on the bundled defaults:
# the perturbation gallery, a short CPPO run on the bundled demo model and the shapes task, then the
# perception-token detector on the trained model. Outputs under OUT_DIR (default runs/demo).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
out="${1:-runs/demo}"
cppo-perturb --out "$out/perturb"
# --resume auto: running the demo again continues (or, if finished, reuses) the same run.
cppo-train --output-dir "$out/train" --resume auto
ckpt="$(ls -d "$out"/train/checkpoints/step-* | tail -n 1)"
cppo-detect --model "$ckpt" --out "$out/detect"
echo "[demo] done: gallery $out/perturb/gallery.png, curves $out/train/curves.png, report $out/detect/report.html"
