#!/usr/bin/env bash
# The suite's fast tests that can call transformers, and the two-process FSDP runs, again on the
# lowest transformers cppo accepts (scripts/floor-requirements.txt), so that a release that silently
# drops an argument (5.17 and `mm_encoder_outputs`) fails CI.
# The main ./.venv is reused; the floor's packages go into ./.venv/transformers-floor, first on
# PYTHONPATH. Extra arguments go to pytest, e.g. `bash scripts/test_floor.sh tests/test_image_is_seen.py`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
floor="$venv/transformers-floor"
want="$(sha256sum scripts/floor-requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$floor/.stamp" 2>/dev/null)" != "$want" ]; then
    echo "[setup] installing the floor's packages into $floor"
    rm -rf "$floor"
    python -m pip install -q --no-deps --target "$floor" -r scripts/floor-requirements.txt
    echo "$want" > "$floor/.stamp"
fi
export PYTHONPATH="$floor${PYTHONPATH:+:$PYTHONPATH}"
python -c "import transformers, sys; print(f'[floor] transformers {transformers.__version__}'); \
sys.exit(transformers.__version__ != '$(sed -n 's/^transformers==//p' scripts/floor-requirements.txt)')"
if [ $# -gt 0 ]; then
    exec python -m pytest "$@"
fi
# only the tests that can call transformers or huggingface_hub (tests/floor_scope.py says how that is
# worked out); the rest do the same on either version
CPPO_FLOOR_SCOPE=1 python -m pytest -m "not slow" -p no:cacheprovider
# the FSDP path (the GPU image's transformers is the floor): two-process runs, slow-marked
exec python -m pytest -p no:cacheprovider tests/test_fsdp_generation.py tests/test_rl_fsdp.py \
    tests/test_fsdp_load.py "tests/test_rl_loop.py::test_two_processes_equal_one_process_on_the_combined_batch"
