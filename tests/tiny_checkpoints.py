"""Tiny random Llama / Qwen2 checkpoints written by transformers, for parity tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# Three architectures the paper's backbones need, each exercising a different switch.
KINDS = {
    # Grouped-query attention and Llama-3.1 rope scaling; a short original context so that
    # all three frequency bands (kept, blended, slowed) occur at head_dim 16.
    "llama_gqa_llama3": lambda: LlamaForCausalLM(
        LlamaConfig(
            **_COMMON,
            num_key_value_heads=2,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    ),
    "llama_tied": lambda: LlamaForCausalLM(
        LlamaConfig(**_COMMON, num_key_value_heads=4, tie_word_embeddings=True)
    ),
    "qwen2_bias": lambda: Qwen2ForCausalLM(
        Qwen2Config(**_COMMON, num_key_value_heads=2, rope_parameters={"rope_theta": 1e6})
    ),
}


def make_checkpoint(kind: str, folder: Path, seed: int = 0, **save_kwargs) -> torch.nn.Module:
    """Writes a random checkpoint of `kind` to `folder` and returns the PyTorch model."""
    torch.manual_seed(seed)
    model = randomize(KINDS[kind]().eval())
    model.save_pretrained(folder, **save_kwargs)
    return model


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every tensor random (from torch's current seed), in place.

    transformers' init leaves biases at 0 and norms at 1; randomising every tensor means a
    parameter loaded into the wrong place cannot go unnoticed.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.08 * torch.randn_like(param))
    return model
