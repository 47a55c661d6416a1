#!/usr/bin/env bash
# The GPU check: one command on one H100/H200, nothing downloaded, under 10 minutes.
#   0. versions: torch, transformers, accelerate printed; a transformers below cppo's floor
#      (cppo.models.versions) is replaced by the floor's wheels from .whl/floor, and the check stops
#      if it still is below;
#   1. the image invariant on CUDA in bf16 (tests/test_image_is_seen.py, `gpu` cases): every pass
#      that scores a response under an image (rollout, old, reference, anchor, I+, I-, the
#      detector's, evaluation) scores differently under a blank image, on the demo model. A failure
#      stops the check: no benchmark number is taken from a path that does not see the image;
#   2. the other `gpu`-marked tests (tests/test_gpu.py: bf16 autocast over float32 master weights
#      on CUDA, the fused head's backward outside autocast, per-step CUDA memory peaks;
#      tests/test_rl_reference.py: --ref-offload's host copy visiting the GPU, and an FSDP-sharded
#      reference with its shards in CPU memory scoring on the GPU);
#   3. bench/gpu_step.py: training steps of a Qwen2.5-VL-3B-shaped model with random weights, bf16
#      compute over float32 master weights, gradient checkpointing; step time per phase, tokens/s
#      and peak memory for GRPO and CPPO, rollouts in generate calls sized from free GPU memory (the
#      path cppo-train takes when --generation-batch-size is not set: the allocator's cache freed,
#      then KV-cache rows for half the free memory), each group from its own seed on the GPU's
#      generators, the padding share of the update's passes; then (--padding) one CPPO step's
#      old/ref + update on mixed response lengths, padded to the step's longest row against trimmed
#      and sorted by length (tokens/s, peak memory), and whether one group per call and the
#      memory-sized calls sampled the same responses. The numbers go to docs/benchmarks.md;
#   4. bench/bench_rollout.py: rollout tokens/s and peak memory of the rollout engine against
#      `generate` (the 256-image-token model, G = 8, 512-token cap, spread lengths), with the engine's
#      dynamic decode and with its CUDA-graph decode (--rollout-engine cppo-graphs). Pending: not yet
#      run on a GPU (docs/benchmarks.md, Rollouts); it adds up to 4 minutes.
# The GPU image has PyTorch and transformers but not the perturbation libraries or the grader:
# run `bash bench/gpu_wheels.sh` here first and carry `.whl` (device tool: carry [".whl"]).
#   bash bench/gpu_check.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else runs/gpu_check
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
site=/tmp/cppo-site
pip_local() { "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$@"; }
if compgen -G ".whl/*.whl" >/dev/null; then
    pip_local .whl/*.whl || exit 1
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
floor_problem() { "$py" -c "from cppo.models.versions import installed_transformers as v, transformers_problem as p
print(p(v()) or '')"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
problem="$(floor_problem)"
if [ -n "$problem" ] && compgen -G ".whl/floor/*.whl" >/dev/null; then
    echo "gpu_check: $problem; installing the floor from .whl/floor" | tee -a "$out/gpu.txt"
    pip_local .whl/floor/*.whl || exit 1
    problem="$(floor_problem)"
fi
"$py" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())" \
    2>&1 | tee -a "$out/gpu.txt"
if [ -n "$problem" ]; then
    echo "gpu_check: $problem (carry .whl/floor: bash bench/gpu_wheels.sh)" | tee -a "$out/gpu.txt"
    exit 1
fi
timeout 120 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_image_is_seen.py 2>&1 | tee "$out/image_seen.log"
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    echo "gpu_check: a pass does not see the image on this GPU/transformers: stopped before any benchmark"
    exit 1
fi
status=0
timeout 120 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_rl_reference.py 2>&1 | tee "$out/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 330 "$py" bench/gpu_step.py --size 3b --device cuda --max-new-tokens 256 \
    --padding --json "$out/gpu_step.json" 2>&1 | tee "$out/gpu_step.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
for decode in dynamic cuda-graphs; do
    timeout 120 "$py" bench/bench_rollout.py --models large --group-sizes 8 --caps 512 --prompts 16 \
        --repeats 2 --decode "$decode" --json "$out/rollout_$decode.json" 2>&1 | tee "$out/rollout_$decode.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
echo "gpu_check: exit $status; outputs in $out"
exit "$status"
