"""Rotary position embeddings, with the `linear` and Llama-3.1 `llama3` frequency rules."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lisendiff_jax.backbone.config import RopeConfig


def inverse_frequencies(head_dim: int, rope: RopeConfig) -> np.ndarray:
    """The per-pair rotation speeds [head_dim // 2], float32 as transformers computes them."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / (np.float32(rope.theta) ** exponents)).astype(np.float32)
    if rope.rope_type == "linear":
        return inv_freq / np.float32(rope.factor)
    if rope.rope_type == "llama3":
        return _llama3_scaling(inv_freq, rope)
    return inv_freq


def _llama3_scaling(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    # Llama 3.1 keeps short wavelengths, slows long ones by `factor`, and blends in between.
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotary_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [batch, seq, head_dim] for integer positions [batch, seq]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, s, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [batch, seq, heads, head_dim] in the half-split layout transformers uses:
    x * cos + [-x2, x1] * sin, where x = [x1, x2]."""
    *lead, head_dim = x.shape
    # [x2, x1] as the reversal of a [2, half] view, with the minus sign moved into sin: both
    # exact, and element-wise for XLA to fuse with the products around them, where a
    # concatenate of slices can be emitted as a kernel of its own.
    swapped = jnp.flip(x.reshape(*lead, 2, head_dim // 2), axis=-2).reshape(x.shape)
    sign = np.repeat(np.array([-1, 1], np.float32), head_dim // 2)  # [head_dim]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = (sin[:, :, None, :] * sign).astype(x.dtype)
    return x * cos + swapped * sin
