#!/usr/bin/env bash
# The project's test command: lint, then the test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export JAX_PLATFORMS=cpu
# One on-disk compilation cache for the whole run, empty at its start: the tests and the train.py
# / sample.py processes they start compile many identical programs (the tiny model's steps, its
# initialisers), which jax's in-memory cache cannot share across processes or fresh closures.
# Every program is cached, however quick its compile (jax's documented "cache all" settings).
JAX_COMPILATION_CACHE_DIR=$(mktemp -d)
trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
export JAX_COMPILATION_CACHE_DIR
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
ruff check .
ruff format --check .
# Two workers, each taking whole files (their fixtures are built once per worker): on a 2-core
# AMD EPYC without AVX-512 the suite takes 12:24 to 12:59 (15:22 to 16:40 before conftest.py
# chose XLA:CPU's elemental code generator; 18:29 to 19:46 before it compiled at LLVM level 0
# and prompts were padded to powers of two; 21:52 without the cache above too), and less than
# serially, as the tests wait on compiles, subprocesses and sockets as much as on arithmetic;
# three workers were no faster there (16:57 against 16:40, before the code generator). Later
# arguments win: `-n 0` runs serially.
python -m pytest -q -n 2 --dist loadfile "$@"
