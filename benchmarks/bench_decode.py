"""Greedy decoding throughput: our jitted KV-cache loop vs transformers' `generate`.

Both decode the same random ~34M-parameter Llama (written once by transformers, loaded by us
from its safetensors), from the same prompts, for the same number of new tokens (no early
stop). Prints tokens/s of each and the ratio ours / transformers.

    python benchmarks/bench_decode.py [--batch 1 8] [--prompt-len 32] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lisendiff_jax.backbone import load_backbone
from lisendiff_jax.backbone.generate import SamplingParams, generate

MODEL = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compilation for ours, allocator warm-up for torch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    torch_model = LlamaForCausalLM(LlamaConfig(**MODEL)).eval()
    n_params = sum(p.numel() for p in torch_model.parameters())
    with tempfile.TemporaryDirectory() as folder:
        torch_model.save_pretrained(folder)
        ours = load_backbone(folder, dtype="float32")

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__}")
    print(f"model: random Llama, {n_params / 1e6:.1f}M parameters, float32")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, no early stop")
    print(f"{'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>6}")
    params = SamplingParams(max_new_tokens=args.new_tokens)
    for batch in args.batch:
        shape = (batch, args.prompt_len)
        prompts = np.random.RandomState(batch).randint(3, MODEL["vocab_size"], shape)

        def run_ours(prompts=prompts):
            jax.block_until_ready(generate(ours, prompts, params=params).tokens)

        def run_torch(prompts=prompts):
            with torch.inference_mode():
                torch_model.generate(
                    torch.tensor(prompts),
                    attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )

        tokens = batch * args.new_tokens
        ours_tps = tokens / median_seconds(run_ours, args.repeats)
        torch_tps = tokens / median_seconds(run_torch, args.repeats)
        print(f"{batch:>5} {ours_tps:>11.1f} {torch_tps:>19.1f} {ours_tps / torch_tps:>6.2f}")


if __name__ == "__main__":
    main()
