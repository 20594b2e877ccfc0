#!/usr/bin/env bash
# Every GPU check in one run, for a lent H100/H200 (under 10 minutes):
#   1. the training step of a Llama-3.1-8B-shaped random model in bf16 with the paper's
#      settings (LisenDiff, then the LoRA-only baseline), and transformers + PEFT on the same
#      shape: tokens/s, model FLOPs utilisation, peak memory, and whether it fits 24 GB;
#   2. greedy decoding of the same shape, ours vs transformers' generate;
#   3. the latent sampler at the paper's sizes (d_enc 768, T = 50): the chain as one scan vs
#      a Python loop of jitted steps, latents/s at batch 1 and 64.
# Each part runs in its own process so that peak memory is its own.
# Usage, from the repository root: bash benchmarks/gpu_check.sh
# Python wheels in .whl/ (packages the GPU image lacks) are installed first if present; the lent
# H200/H100 image lacks ml_collections: `pip download --no-deps -d .whl ml_collections==1.1.0`.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG="${OUT:-/tmp}/gpu_check.log"
if compgen -G ".whl/*.whl" >/dev/null; then
    rm -rf /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
# Without preallocation, the peak that JAX reports is what the run needed, not 75% of the card.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

part() {
    local title=$1 limit=$2
    shift 2
    echo "== $title" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | grep -v -e "^W0000" -e "^I0000" | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
python3 -c "import jax, flax, torch, transformers as t; print('jax', jax.__version__, \
'flax', flax.__version__, 'torch', torch.__version__, 'transformers', t.__version__)" | tee -a "$LOG"
TRAIN=(python3 benchmarks/bench_train_step.py --size 8b --batch 1 --seq 512 --steps 5)
# Limits add up to 580 s; the H200 run of the first four parts took 510 s in all.
part "train step: LisenDiff, paper settings" 170 "${TRAIN[@]}" --no-peft --variants lisendiff
part "train step: LoRA-only baseline" 130 "${TRAIN[@]}" --no-peft --variants lora_only
part "train step: transformers + PEFT LoRA" 120 "${TRAIN[@]}" --variants
part "decode: ours vs transformers.generate" 110 \
    python3 benchmarks/bench_decode.py --size 8b --batch 1 8 --new-tokens 128 --repeats 2
part "sampler: scan vs loop of jitted steps" 50 \
    python3 benchmarks/bench_sampler.py --batch 1 64 --repeats 5 --e2e-batch
