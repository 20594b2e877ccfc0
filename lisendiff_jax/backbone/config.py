"""The backbone's architecture, read from a Hugging Face `config.json`.

Both paper backbones (Llama-3.1-8B-Instruct, Qwen2-7B) are the same decoder up to a few switches:
biases on the attention projections, tied embeddings and the rotary scaling rule. One frozen
structure holds those switches so the model code never looks at raw HF dictionaries.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lisendiff_jax.errors import UserError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class BackboneConfigError(UserError, ValueError):
    """A checkpoint whose config this backbone cannot represent."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # Only the `llama3` rule uses these three.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise BackboneConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def num_params(self) -> int:
        """Parameter count, as transformers would report it."""
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attn = self.hidden_size * (q + 2 * kv) + q * self.hidden_size
        attn += (q + 2 * kv) * self.qkv_bias + self.hidden_size * self.o_bias
        mlp = 3 * self.hidden_size * self.intermediate_size
        mlp += (2 * self.intermediate_size + self.hidden_size) * self.mlp_bias
        layer = attn + mlp + 2 * self.hidden_size
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return self.num_layers * layer + embed + head + self.hidden_size

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json") -> BackboneConfig:
        """Builds the config from the keys of an HF `config.json` (transformers 4 or 5)."""
        arch = hf.get("model_type")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise BackboneConfigError(
                f"{source}: model_type {arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise BackboneConfigError(f"{source}: hidden_act {act!r} is not supported (only silu)")
        if hf.get("use_sliding_window"):
            raise BackboneConfigError(f"{source}: sliding-window attention is not supported")
        try:
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            attention_bias = bool(hf.get("attention_bias", False))
            return cls(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(hf.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope=_rope_from_hf(hf, source),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases and none on o_proj; Llama has one switch for all.
                qkv_bias=arch == "qwen2" or attention_bias,
                o_bias=arch == "llama" and attention_bias,
                mlp_bias=bool(hf.get("mlp_bias", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=_as_id_tuple(hf.get("eos_token_id")),
                pad_token_id=hf.get("pad_token_id"),
            )
        except KeyError as missing:
            raise BackboneConfigError(f"{source}: missing key {missing}") from None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> BackboneConfig:
        """Reads `config.json`, and the EOS ids of `generation_config.json` when present."""
        folder = Path(folder)
        path = folder / "config.json"
        if not path.is_file():
            raise BackboneConfigError(f"{path}: not found")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise BackboneConfigError(f"{path}: line {err.lineno}: invalid JSON") from None
        config = cls.from_hf_dict(hf, source=str(path))
        # Instruct models list their end-of-turn ids here, not in config.json.
        gen_path = folder / "generation_config.json"
        if gen_path.is_file():
            gen_eos = _as_id_tuple(json.loads(gen_path.read_text()).get("eos_token_id"))
            merged = tuple(dict.fromkeys(config.eos_token_ids + gen_eos))
            config = dataclasses.replace(config, eos_token_ids=merged)
        return config


def _as_id_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def _rope_from_hf(hf: dict[str, Any], source: str) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); hub checkpoints written by
    # transformers 4 have `rope_theta` beside an optional `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise BackboneConfigError(
            f"{source}: rope type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    defaults = RopeConfig()
    return RopeConfig(
        rope_type=rope_type,
        theta=theta,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(params.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=int(
            params.get(
                "original_max_position_embeddings", defaults.original_max_position_embeddings
            )
        ),
    )
