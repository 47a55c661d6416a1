#!/usr/bin/env bash
# The GPU check: one command on one H100/H200, nothing downloaded, under 10 minutes.
#   1. the `gpu`-marked tests (tests/test_gpu.py: bf16 autocast over float32 master weights on
#      CUDA, the fused head's backward outside autocast, per-step CUDA memory peaks;
#      tests/test_rl_reference.py: --ref-offload's host copy visiting the GPU, and an FSDP-sharded
#      reference with its shards in CPU memory scoring on the GPU);
#   2. bench/gpu_step.py: training steps of a Qwen2.5-VL-3B-shaped model with random weights, bf16
#      compute over float32 master weights, gradient checkpointing; step time per phase, tokens/s
#      and peak memory for GRPO and CPPO, rollouts generated 10 rows per call (2 calls a step, each
#      group from its own seed on the GPU's generators), the padding share of the update's passes;
#      then (--padding) one CPPO step's old/ref + update on mixed response lengths, padded to the
#      step's longest row against trimmed and sorted by length (tokens/s, peak memory), and whether
#      5 and 10 rows per generate call sampled the same responses. The numbers go to docs/benchmarks.md.
# The GPU image has PyTorch and transformers but not the perturbation libraries or the grader:
# run `bash bench/gpu_wheels.sh` here first and carry `.whl` (device tool: carry [".whl"]).
#   bash bench/gpu_check.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else runs/gpu_check
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/cppo-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/cppo-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$out/gpu.txt"
status=0
timeout 150 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_rl_reference.py 2>&1 | tee "$out/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
timeout 420 "$py" bench/gpu_step.py --size 3b --device cuda --max-new-tokens 256 \
    --generation-batch-size 10 --padding --json "$out/gpu_step.json" 2>&1 | tee "$out/gpu_step.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check: exit $status; outputs in $out"
exit "$status"
