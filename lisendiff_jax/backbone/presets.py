"""`config.json` contents of the backbones this project is sized for.

Benchmarks and the memory arithmetic build these shapes with random weights, so they need no
download; the keys are those of the hub checkpoints (transformers 5 spelling), readable by both
`BackboneConfig.from_hf_dict` and transformers' config classes (see `transformers_kwargs`).
"""

from __future__ import annotations

from typing import Any


def llama3_rope(original_max_position_embeddings: int = 8192) -> dict[str, Any]:
    """Llama-3.1's rotary scaling; smaller originals let tiny models use all three bands."""
    return {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_max_position_embeddings,
    }


LLAMA_3_1_8B: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "rope_parameters": llama3_rope(),
}
QWEN2_7B: dict[str, Any] = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
}
# A 34M-parameter Llama-3.1 look-alike (untied head) for CPU benchmarks.
LLAMA_34M: dict[str, Any] = dict(
    LLAMA_3_1_8B,
    vocab_size=16000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=4,
)
# The embedded default's shape (its vocabulary comes from its tokenizer); small enough to train
# on a laptop CPU in minutes.
LLAMA_TINY: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
    rope_parameters=llama3_rope(original_max_position_embeddings=1024),
)
PRESETS = {"llama-3.1-8b": LLAMA_3_1_8B, "qwen2-7b": QWEN2_7B, "llama-34m": LLAMA_34M}


def transformers_kwargs(preset: dict[str, Any]) -> dict[str, Any]:
    """The preset as keyword arguments of LlamaConfig / Qwen2Config."""
    return {k: v for k, v in preset.items() if k != "model_type"}
