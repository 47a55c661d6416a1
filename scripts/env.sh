# Sourced by scripts/demo.sh and scripts/test.sh: creates or reuses ./.venv and installs cppo into it.
# Installs the pinned torch first when torch is absent, so that no unpinned requirement (kornia,
# accelerate, ...) pulls a different torch build. Override the pin with CPPO_TORCH_SPEC.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CPPO_VENV:-$repo/.venv}"
torch_spec="${CPPO_TORCH_SPEC:-torch==2.13.0}"
python_bin="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "[setup] creating virtual environment $venv"
    "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing $torch_spec"
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q "$torch_spec"
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp="$venv/.cppo-install-stamp"
want="$(sha256sum "$repo/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$py" -c "import cppo" >/dev/null 2>&1; then
    echo "[setup] installing cppo and its dependencies"
    "$py" -m pip install -q -e "$repo[dev]"
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false
