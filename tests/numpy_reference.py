"""NumPy (float64) versions of the method's attention pieces, written from the formulas, for
tests that compare the Flax modules against independent math; plus a helper that gives every
parameter of a module random values, so a weight used in the wrong place cannot hide behind
its initial value (ones, zeros)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx


def randomise_parameters(module: nnx.Module, seed: int = 0) -> None:
    """Norm scales become 1 + 0.2 N(0, 1), every other parameter 0.3 N(0, 1), in place."""
    rng = np.random.RandomState(seed)
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        noise = rng.randn(*var.shape)
        value = 1.0 + 0.2 * noise if path[-1] == "scale" else 0.3 * noise
        var.set_value(jnp.asarray(value, var.dtype))


def weights(module: nnx.Module) -> dict[str, np.ndarray]:
    """Every parameter of `module` as float64, keyed by its dotted path."""
    return {
        ".".join(map(str, path)): np.asarray(var[...], np.float64)
        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt(np.square(centred).mean(-1, keepdims=True) + eps) * scale + bias


def rms_norm(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.square(x).mean(-1, keepdims=True) + eps) * scale


def gelu(x: np.ndarray) -> np.ndarray:
    """The tanh approximation (jax.nn.gelu's default)."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def multi_head_attention(
    queries: np.ndarray,  # [batch, t, query_dim], already normed
    keys_values: np.ndarray,  # [batch, l, kv_dim], already normed
    mask: np.ndarray | None,  # [batch, l] bool
    w: dict[str, np.ndarray],  # q_proj, k_proj, v_proj, o_proj kernels ([in, out])
    num_heads: int,
) -> np.ndarray:  # [batch, t, query_dim]
    """softmax(q k^T / sqrt(head_dim)) v per head over the unmasked keys, then the output
    projection; a query with no unmasked key reads nothing (zeros)."""
    b, t, _ = queries.shape
    n = keys_values.shape[1]
    q = (queries @ w["q_proj"]).reshape(b, t, num_heads, -1)
    k = (keys_values @ w["k_proj"]).reshape(b, n, num_heads, -1)
    v = (keys_values @ w["v_proj"]).reshape(b, n, num_heads, -1)
    out = np.zeros_like(q)
    allowed = np.ones((b, n), bool) if mask is None else np.asarray(mask, bool)
    for row in range(b):
        keep = allowed[row]
        if not keep.any():
            continue
        for head in range(num_heads):
            scores = q[row, :, head] @ k[row, keep, head].T / np.sqrt(q.shape[-1])  # [t, l']
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[row, :, head] = probs @ v[row, keep, head]
    return out.reshape(b, t, -1) @ w["o_proj"]


def attention_weights(w: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The four projection kernels of the MultiHeadCrossAttention at `prefix` in `w`."""
    return {name: w[f"{prefix}.{name}.kernel"] for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
