#!/usr/bin/env bash
# The project's test command: lint, then the test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export JAX_PLATFORMS=cpu
ruff check .
ruff format --check .
# Two workers, each taking whole files (their fixtures are built once per worker): on a 2-core
# machine the suite takes about 12 minutes, less than serially, as the tests wait on compiles,
# subprocesses and sockets as much as on arithmetic. Later arguments win: `-n 0` runs serially.
python -m pytest -q -n 2 --dist loadfile "$@"
