"""The Llama-3.x / Qwen2 decoder: architecture, checkpoint loading and KV-cache decoding."""

from lisendiff_jax.backbone.config import BackboneConfig, BackboneConfigError, RopeConfig
from lisendiff_jax.backbone.loading import CheckpointError, load_backbone
from lisendiff_jax.backbone.model import Decoder, KVCache

__all__ = [
    "BackboneConfig",
    "BackboneConfigError",
    "CheckpointError",
    "Decoder",
    "KVCache",
    "RopeConfig",
    "load_backbone",
]
