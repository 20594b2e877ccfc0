#!/usr/bin/env bash
# The GPU checks on one H100/H200, each part under its own time limit:
#   1. the training step of a Llama-3.1-8B-shaped random model in bf16 with the paper's
#      settings: LisenDiff on a bf16 base (train_lisendiff), on an int8 and on an nf4 one
#      (train_int8, train_nf4: model.base_quantization), the LoRA-only baseline
#      (train_lora_only), the same with the `attention` or `dots` remat policy instead of
#      `full` (train_lora_only_remat_attention, train_lora_only_remat_dots) and
#      transformers + PEFT on the same shape (train_peft): tokens/s, model FLOPs
#      utilisation, peak memory, and whether it fits a 24, 16 or 12 GB card;
#   2. greedy decoding of the same shape, ours vs transformers' generate (decode);
#   3. the latent sampler at the paper's sizes (d_enc 768, T = 50): the chain as one scan vs
#      a Python loop of jitted steps, latents/s at batch 1 and 64 (sampler);
#   4. cuDNN flash attention (model.attention=cudnn, which "auto" picks here, so the training
#      steps above run it) against the einsum kernel: logits and gradients of a left-padded
#      bf16 batch against float32, and the time of each (attention);
#   5. packed vs bucketed batches of real dialogue at max_length 512, real tokens/s of the 34M
#      model's LisenDiff step (packing): only with GPU_CHECK_ESCONV=FILE, ESConv in the JSONL
#      dialogue format (docs/data.md), which the repository does not ship;
#   6. the LoRA-only step's GPU time by kernel: matrix products, attention, the rest
#      (profile);
#   7. the trained bf16 LM head's optimizer update alone, in each model.low_precision_update,
#      vs torch's AdamW (head_update).
# Together they take more than 10 minutes, so a run takes the parts GPU_CHECK_PARTS names
# (and the environment). Their time limits add up, with the environment and wheels, to 590 s
# for the default, "train_lora_only train_lisendiff attention sampler"; to 520 s for
# "train_int8 train_nf4"; to 595 s for "train_peft decode packing profile"; to 500 s for
# "train_lora_only_remat_attention train_lora_only_remat_dots head_update". On an H200
# (jax 0.11.2) the 8B steps took 119 s (LoRA-only) and 150 s (LisenDiff) to compile; compiled
# programs go to a persistent cache (JAX_COMPILATION_CACHE_DIR, default under TMPDIR), so a
# second run on the same machine skips most of that (its "compile" figures are then the
# cache's).
# The environment part first checks that every package the parts import is there, and stops
# the run naming the missing ones.
# Each part runs in its own process so that peak memory is its own. After each part a status
# line says `part NAME: ok (S s)`, `FAILED rc=N (S s)` or `TIMED OUT after LIMIT s`; a summary
# ends the run, and the exit status is 1 when any part did not finish ok.
#
# Usage, from anywhere:  bash benchmarks/gpu_check.sh
#   GPU_CHECK_LOG=FILE  where the log goes (default /tmp/gpu_check.log);
#   PYTHON=INTERPRETER  the Python that runs the parts (default python3);
#   GPU_CHECK_PARTS="NAME ..."  the parts to run (default above);
#   GPU_CHECK_ESCONV=FILE  the ESConv JSONL file the packing part needs.
# Packages the GPU machine lacks can be put in .whl/ as wheels (e.g. `pip download --no-deps
# -d .whl ml_collections==1.1.0`); they are installed into /tmp/site first.
# An H200 machine with jax 0.11.2, torch and transformers lacked ml_collections, langcodes,
# qwix, openpyxl and et_xmlfile.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${GPU_CHECK_LOG:-${TMPDIR:-/tmp}/gpu_check.log}"
PYTHON="${PYTHON:-python3}"
PARTS=" ${GPU_CHECK_PARTS:-train_lora_only train_lisendiff attention sampler} "
: >"$LOG"
# Without preallocation, the peak that JAX reports is what the run needed, not 75% of the card.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${TMPDIR:-/tmp}/lisendiff_jax_xla_cache}"
export PYTHONPATH="$PWD"

say() { echo "$*" | tee -a "$LOG"; }

STATUS=()
FAILED=0
# wanted NAME: whether GPU_CHECK_PARTS names the part.
wanted() { [[ "$PARTS" == *" $1 "* ]]; }
# part NAME LIMIT_S COMMAND...: runs COMMAND under `timeout LIMIT_S`, its output (less absl's
# W0000/I0000 noise) to the terminal and the log, then one status line.
part() {
    local name=$1 limit=$2 start rc elapsed line
    shift 2
    say "== $name: $*"
    start=$SECONDS
    # A part that ignores SIGTERM is killed 5 s later.
    timeout -k 5 "$limit" "$@" 2>&1 | { grep -v -e "^W0000" -e "^I0000" || true; } |
        tee -a "$LOG"
    rc=${PIPESTATUS[0]} elapsed=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        line="part $name: ok ($elapsed s)"
    elif [ "$rc" -eq 124 ] || { [ "$rc" -eq 137 ] && [ "$elapsed" -ge "$limit" ]; }; then
        line="part $name: TIMED OUT after $limit s"
    else  # 137 before the limit: killed, e.g. out of host memory
        line="part $name: FAILED rc=$rc ($elapsed s)"
    fi
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
    STATUS+=("$line")
    say "$line"
}

if compgen -G ".whl/*.whl" >/dev/null; then
    rm -rf /tmp/site
    part wheels 10 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
fi
environment() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader &&
        "$PYTHON" - <<'PY'
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

for name in ("jax", "jaxlib", "flax", "torch", "transformers", "peft"):
    try:
        print(name, version(name), end="  ")
    except PackageNotFoundError:
        print(name, "NOT INSTALLED", end="  ")
print()
missing = []
# What the parts import, the lazily imported ones too (qwix: int8/nf4; openpyxl: packing's
# bundled data).
for module in ("lisendiff_jax.train.loop", "qwix", "openpyxl", "peft"):
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        missing.append(error.name)
if missing:
    sys.exit(f"missing Python packages: {' '.join(missing)} (put their wheels in .whl/)")
PY
}
export -f environment
export PYTHON
part environment 30 bash -c environment
if [ "$FAILED" -ne 0 ]; then
    say "the environment is incomplete: no part was run"
    exit 1
fi
TRAIN=("$PYTHON" benchmarks/bench_train_step.py --size 8b --batch 1 --seq 512 --steps 5)
# Each base in its own process, so that each peak is its own (bench_train_step.py makes a
# quantized backbone layer by layer: no float copy of it counts in the peak).
wanted train_lora_only && part train_lora_only 200 "${TRAIN[@]}" --no-peft --variants lora_only
wanted train_lisendiff && part train_lisendiff 240 "${TRAIN[@]}" --no-peft --variants lisendiff
for base in int8 nf4; do
    wanted "train_$base" && part "train_$base" 240 "${TRAIN[@]}" --no-peft --variants lisendiff \
        --base-quantization "$base"
done
for policy in attention dots; do
    wanted "train_lora_only_remat_$policy" && part "train_lora_only_remat_$policy" 200 \
        "${TRAIN[@]}" --no-peft --variants lora_only --remat "$policy"
done
wanted train_peft && part train_peft 105 "${TRAIN[@]}" --variants
wanted decode && part decode 100 \
    "$PYTHON" benchmarks/bench_decode.py --size 8b --batch 1 8 --new-tokens 128 --repeats 2
wanted sampler && part sampler 50 \
    "$PYTHON" benchmarks/bench_sampler.py --batch 1 64 --repeats 5 --e2e-batch
wanted attention && part attention 60 "$PYTHON" benchmarks/check_attention.py
wanted profile && part profile 170 "$PYTHON" benchmarks/profile_step.py
wanted head_update && part head_update 60 \
    "$PYTHON" benchmarks/bench_head_update.py --size 8b --steps 10
if wanted packing && [ -z "${GPU_CHECK_ESCONV:-}" ]; then
    say "part packing: skipped (GPU_CHECK_ESCONV names no ESConv file)"
elif wanted packing; then
    part packing 180 "$PYTHON" benchmarks/bench_train_step.py --packing "$GPU_CHECK_ESCONV" \
        --max-length 512 --steps 16
fi

say "== summary ($SECONDS s in all; log: $LOG)"
for line in "${STATUS[@]}"; do
    say "$line"
done
if [ "$FAILED" -ne 0 ]; then
    say "$FAILED part(s) did not finish ok: the figures above are incomplete"
    exit 1
fi
say "all parts ok"
