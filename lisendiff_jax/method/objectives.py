"""The model's objectives as pure functions: the LM loss's token NLL (the diffusion loss is
`diffusion.x0_loss`)."""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp


def token_nll(
    logits_fn: Callable[[jax.Array], jax.Array],
    hidden: jax.Array,  # [batch, seq, hidden]
    targets: jax.Array,  # [batch, seq] int32, the token each position predicts
    weights: jax.Array,  # [batch, seq] float32, 0 where no loss
    vocab_size: int,
    max_logits_bytes: int = 2**28,
) -> jax.Array:
    """Summed negative log-likelihood over the weighted positions.

    When the float32 logits [batch, seq, vocab] would exceed `max_logits_bytes`, they are
    computed a chunk of positions at a time and recomputed in the backward pass rather than
    stored, so a 128k vocabulary with long sequences never holds them all at once.
    """
    b, t, _ = hidden.shape
    chex.assert_shape([targets, weights], (b, t))

    def nll(h, y, w):
        logits = logits_fn(h).astype(jnp.float32)  # [b, chunk, vocab]
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return jnp.sum((logz - picked) * w)

    chunk = max(1, max_logits_bytes // (b * vocab_size * 4))
    if chunk >= t:
        return nll(hidden, targets, weights)
    pad = -t % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    n = (t + pad) // chunk

    def split(x):  # [b, n * chunk, ...] -> [n, b, chunk, ...]
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    def body(total, xs):
        return total + jax.checkpoint(nll)(*xs), None

    total, _ = jax.lax.scan(
        body, jnp.zeros((), jnp.float32), (split(hidden), split(targets), split(weights))
    )
    return total
