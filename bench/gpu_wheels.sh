#!/usr/bin/env bash
# Fetches, on this machine (which reaches PyPI), the wheels that a GPU machine with no network needs
# beside its own PyTorch/transformers image to import cppo: the perturbation libraries and the
# grader, and in .whl/floor/ the lowest transformers cppo accepts. They land in .whl/ (ignored by git);
# bench/gpu_check.sh installs them from there.
#   bash bench/gpu_wheels.sh            # then carry .whl to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
py="${GPU_PYTHON_VERSION:-3.12}"
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform any)
for spec in albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 stringzilla==5.3.2 simsimd==6.5.16 \
    kornia==0.9.0 kornia-rs==0.2.0 math-verify==0.9.0 latex2sympy2-extended==1.11.0 \
    antlr4-python3-runtime==4.13.2; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
        --implementation cp "${platforms[@]}" -d .whl "$spec"
done
# The transformers floor (scripts/floor-requirements.txt) in its own folder: bench/gpu_check.sh
# installs it only on an image whose transformers is below cppo's floor.
mkdir -p .whl/floor
grep -v '^#' scripts/floor-requirements.txt | grep . | while read -r spec; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
        --implementation cp "${platforms[@]}" -d .whl/floor "$spec"
done
ls -l .whl .whl/floor
