"""The model's objectives as pure functions: the LM loss's token NLL (the diffusion loss is
`diffusion.x0_loss`)."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp


def token_nll(
    hidden: jax.Array,  # [batch, seq, hidden]
    head: jax.Array,  # [hidden, vocab], the LM head's weights
    targets: jax.Array,  # [batch, seq] int32, the token each position predicts
    weights: jax.Array,  # [batch, seq] float32, 0 where no loss
    dtype: jnp.dtype = jnp.float32,  # of the products; logits are float32 whatever it is
    max_logits_bytes: int = 2**28,
    chunk_positions: int = 128,
) -> jax.Array:
    """Summed negative log-likelihood over the weighted positions, with its own gradient.

    The LM head is the step's largest product (hidden x vocab per position) while most positions
    of a dialogue carry no loss (the context before the reply). So each row's weighted positions
    are moved to its front (in order), the rows are cut into chunks of `chunk_positions`
    (fewer when `max_logits_bytes` of float32 logits [batch, chunk, vocab] would not hold
    them), and only the chunks in which some row has a weight are computed, in a loop whose
    length is known at run time. The float32 logits of the whole sequence never exist: each
    chunk's are reduced to the loss in the forward pass and to the gradients (softmax minus
    one-hot, times the weight) in the backward pass, where they are computed again. When the
    head's gradient is no larger than `max_logits_bytes`, the forward pass computes the
    gradients right away and keeps them instead, which saves that recomputation.
    """
    b, t, d = hidden.shape
    vocab = head.shape[1]
    chex.assert_shape(head, (d, vocab))
    chex.assert_shape([targets, weights], (b, t))
    chunk = max(1, min(chunk_positions, t, max_logits_bytes // (b * vocab * 4)))
    # Sorting along the sequence keeps each row on its own device when the batch is sharded.
    order = jnp.argsort(weights == 0, axis=1, stable=True)  # [b, t], weighted positions first
    hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
    targets = jnp.take_along_axis(targets, order, axis=1)
    weights = jnp.take_along_axis(weights, order, axis=1)
    pad = -t % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    n_chunks = -(-jnp.max(jnp.sum(weights != 0, axis=1)) // chunk)  # int32 scalar
    keep = head.size * head.dtype.itemsize <= max_logits_bytes
    return _sorted_nll(chunk, jnp.dtype(dtype), keep, hidden, head, targets, weights, n_chunks)


def _chunked_nll(
    chunk: int,
    dtype: jnp.dtype,
    hidden: jax.Array,  # [b, n * chunk, d], weighted positions first
    head: jax.Array,  # [d, vocab]
    targets: jax.Array,  # [b, n * chunk]
    weights: jax.Array,  # [b, n * chunk]
    n_chunks: jax.Array,  # int32 scalar: chunks from the front that hold any weight
    grad_hidden: bool,
    grad_head: bool,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The NLL and, as asked, its gradients for hidden [b, n * chunk, d] and head [d, vocab].

    The head's gradient is summed over chunks in the head's own dtype, as autodiff's would be.
    """
    compute_head = head.astype(dtype)

    def body(i, carry):
        total, d_hidden, d_head = carry
        start = i * chunk
        h = jax.lax.dynamic_slice_in_dim(hidden, start, chunk, axis=1).astype(dtype)
        y = jax.lax.dynamic_slice_in_dim(targets, start, chunk, axis=1)
        w = jax.lax.dynamic_slice_in_dim(weights, start, chunk, axis=1)
        logits = jnp.einsum("bcd,dv->bcv", h, compute_head, preferred_element_type=jnp.float32)
        logz = jax.nn.logsumexp(logits, axis=-1)  # [b, c]
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        total += jnp.sum((logz - picked) * w)
        if grad_hidden or grad_head:
            one_hot = jnp.arange(logits.shape[-1]) == y[..., None]
            g = ((jnp.exp(logits - logz[..., None]) - one_hot) * w[..., None]).astype(dtype)
        if grad_hidden:
            dh = jnp.einsum("bcv,dv->bcd", g, compute_head, preferred_element_type=jnp.float32)
            d_hidden = jax.lax.dynamic_update_slice_in_dim(
                d_hidden, dh.astype(d_hidden.dtype), start, axis=1
            )
        if grad_head:
            dw = jnp.einsum("bcd,bcv->dv", h, g, preferred_element_type=jnp.float32)
            d_head += dw.astype(d_head.dtype)
        return total, d_hidden, d_head

    init = (
        jnp.zeros((), jnp.float32),
        jnp.zeros_like(hidden) if grad_hidden else None,
        jnp.zeros_like(head) if grad_head else None,
    )
    return jax.lax.fori_loop(0, n_chunks, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _sorted_nll(chunk, dtype, keep, hidden, head, targets, weights, n_chunks):
    return _chunked_nll(chunk, dtype, hidden, head, targets, weights, n_chunks, False, False)[0]


def _sorted_nll_fwd(chunk, dtype, keep, hidden, head, targets, weights, n_chunks):
    # symbolic_zeros: each argument comes as (value, perturbed); a frozen head gets no gradient.
    args = tuple(a.value for a in (hidden, head, targets, weights, n_chunks))
    grads = (hidden.perturbed, head.perturbed)
    if keep:
        total, d_hidden, d_head = _chunked_nll(chunk, dtype, *args, *grads)
        return total, (d_hidden, d_head, None)
    total = _chunked_nll(chunk, dtype, *args, False, False)[0]
    return total, (None, None, (args, grads))


def _sorted_nll_bwd(chunk, dtype, keep, residuals, cotangent):
    d_hidden, d_head, recompute = residuals
    if recompute is not None:
        args, grads = recompute
        _, d_hidden, d_head = _chunked_nll(chunk, dtype, *args, *grads)

    def scale(g):
        return None if g is None else (g * cotangent).astype(g.dtype)

    return scale(d_hidden), scale(d_head), None, None, None


_sorted_nll.defvjp(_sorted_nll_fwd, _sorted_nll_bwd, symbolic_zeros=True)
