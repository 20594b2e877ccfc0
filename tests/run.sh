#!/usr/bin/env bash
# The project's test command: lint, then the test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export JAX_PLATFORMS=cpu
ruff check .
ruff format --check .
python -m pytest -q "$@"
