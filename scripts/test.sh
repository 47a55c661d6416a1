#!/usr/bin/env bash
# Sets everything up (./.venv, pinned CPU torch, cppo[dev]) and runs the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow" -x`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$repo"
ruff check .
exec python -m pytest "$@"
