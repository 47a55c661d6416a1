#!/usr/bin/env bash
# Sets everything up (./.venv, pinned CPU torch, cppo) and runs the main job on the bundled defaults.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
out="${1:-runs/demo}"
cppo-perturb --out "$out/perturb"
echo "[demo] done: see $out"
