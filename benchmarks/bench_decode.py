"""Greedy decoding throughput: our jitted KV-cache loop vs transformers' `generate`.

Both decode a random Llama from the same prompts for the same number of new tokens (no early
stop) and print tokens/s and the ratio ours / transformers.

- `--size 34m` (default, CPU, float32): one checkpoint written by transformers and loaded by
  us, so both run the very same weights.
- `--size 8b` (GPU, bfloat16): Llama-3.1-8B's shape; each side initialises its own random
  weights on the device (writing 16 GB to disk would dominate the run), which does not change
  the speed of decoding a fixed number of tokens.

    python benchmarks/bench_decode.py [--size 34m|8b] [--batch 1 8] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM

from lisendiff_jax.backbone import BackboneConfig, load_backbone
from lisendiff_jax.backbone.generate import SamplingParams, generate
from lisendiff_jax.backbone.model import Decoder
from lisendiff_jax.backbone.presets import LLAMA_3_1_8B, LLAMA_34M, transformers_kwargs

SIZES = {"34m": LLAMA_34M, "8b": LLAMA_3_1_8B}


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compilation for ours, allocator and kernel selection for torch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_models(size: str):
    """(transformers model, our model) on the default device of each framework."""
    hf = LlamaConfig(**transformers_kwargs(SIZES[size]))
    torch.manual_seed(0)
    if size == "34m":
        torch_model = LlamaForCausalLM(hf).eval()
        with tempfile.TemporaryDirectory() as folder:
            torch_model.save_pretrained(folder)
            return torch_model, load_backbone(folder, dtype="float32")
    with torch.device("cuda"):
        torch_model = LlamaForCausalLM._from_config(hf, dtype=torch.bfloat16).eval()
    config = BackboneConfig.from_hf_dict(SIZES[size])
    ours = nnx.jit(
        lambda: Decoder(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    )()
    return torch_model, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="34m")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    torch_model, ours = build_models(args.size)
    torch_device = next(torch_model.parameters()).device
    n_params = sum(p.numel() for p in torch_model.parameters())
    device = jax.devices()[0]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores; "
        f"jax {jax.__version__} on {device.device_kind}; torch {torch.__version__} on "
        f"{torch.cuda.get_device_name() if torch_device.type == 'cuda' else 'cpu'}"
    )
    print(
        f"model: random Llama, {n_params / 1e6:.1f}M parameters, "
        f"{next(torch_model.parameters()).dtype}"
    )
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, no early stop")
    print(f"{'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>6}")
    params = SamplingParams(max_new_tokens=args.new_tokens)
    vocab = SIZES[args.size]["vocab_size"]
    for batch in args.batch:
        prompts = np.random.RandomState(batch).randint(3, vocab, (batch, args.prompt_len))

        def run_ours(prompts=prompts):
            jax.block_until_ready(generate(ours, prompts, params=params).tokens)

        def run_torch(prompts=prompts):
            with torch.inference_mode():
                torch_model.generate(
                    torch.tensor(prompts, device=torch_device),
                    attention_mask=torch.ones(prompts.shape, dtype=torch.long, device=torch_device),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            if torch_device.type == "cuda":
                torch.cuda.synchronize()

        tokens = batch * args.new_tokens
        ours_tps = tokens / median_seconds(run_ours, args.repeats)
        torch_tps = tokens / median_seconds(run_torch, args.repeats)
        print(
            f"{batch:>5} {ours_tps:>11.1f} {torch_tps:>19.1f} {ours_tps / torch_tps:>6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
