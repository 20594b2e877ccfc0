"""Smoke demo of the backbone, offline: `python -m lisendiff_jax.backbone.demo`.

Writes a small random Llama-3.1-style checkpoint with transformers, loads it with our loader,
checks our logits and greedy continuation against transformers', and times both decoders.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lisendiff_jax.backbone import load_backbone
from lisendiff_jax.backbone.generate import SamplingParams, generate
from lisendiff_jax.backbone.presets import LLAMA_TINY


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    # The embedded default's shape, with random weights and no tokenizer.
    config = LlamaConfig(**LLAMA_TINY, vocab_size=2048)
    reference = LlamaForCausalLM(config).eval()
    prompt = np.random.RandomState(args.seed).randint(3, config.vocab_size, (2, 12))
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        ours = load_backbone(folder, dtype="float32")
    print(f"random Llama, {sum(p.numel() for p in reference.parameters()) / 1e6:.1f}M params")

    with torch.inference_mode():
        ref_logits = reference(torch.tensor(prompt)).logits.numpy()
        start = time.perf_counter()
        ref_tokens = reference.generate(
            torch.tensor(prompt),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
        ).numpy()[:, prompt.shape[1] :]
        ref_seconds = time.perf_counter() - start
    diff = np.abs(np.asarray(ours(prompt)) - ref_logits).max()
    print(f"max |logits - transformers| = {diff:.2e}")

    params = SamplingParams(max_new_tokens=args.new_tokens)
    jax.block_until_ready(generate(ours, prompt, params=params).tokens)  # compile
    start = time.perf_counter()
    tokens = np.asarray(generate(ours, prompt, params=params).tokens)
    seconds = time.perf_counter() - start
    same = np.array_equal(tokens, ref_tokens)
    print(f"greedy {args.new_tokens} tokens identical to transformers.generate: {same}")
    n = tokens.size
    print(f"decode: ours {n / seconds:.0f} tok/s, transformers {n / ref_seconds:.0f} tok/s")
    if diff > 1e-4 or not same:
        raise SystemExit("backbone does not match transformers")


if __name__ == "__main__":
    main()
