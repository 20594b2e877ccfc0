"""The style-aware context summary x = Attn(q^(s), X): learned queries per style read the
embeddings of the context utterances (a Q-former-like summary, paper eq. 7).

Only the queries are per style; the attention and MLP weights are shared, so both styles read
the context the same way and differ in what they ask of it.

A model trained with context dropout (classifier-free guidance) also has a learned null
summary that stands in for x when the context is dropped. It is one [n_queries, d_enc] for
both styles: each style has its own denoiser, so its prediction from the null summary is still
its own, and a shared null is trained by the dropped examples of both styles.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from lisendiff_jax.method.cross_attention import AttentionBlock


class StyleSummary(nnx.Module):
    """context [batch, n_ctx, d_enc] + mask + style ids [batch] -> x [batch, n_queries, d_enc].

    `depth` pre-norm blocks (attention over the context, then an MLP of width
    mlp_ratio * d_enc, each with a residual); the default is one. A batch may mix styles.

    A row without context utterances (mask all False) gets a zero attention contribution, so it
    returns the style's context-free summary: its queries passed through the residual MLPs.
    Style ids outside [0, n_styles) are clamped by the gather, not reported.

    Parameters: `queries` [n_styles, n_queries, d_enc], `blocks.{j}.*` and, with
    `null_summary`, `null` [n_queries, d_enc] (None without: a model trained without context
    dropout has no such parameter, so its checkpoints are those of the paper's model).
    """

    def __init__(
        self,
        n_styles: int,
        n_queries: int,
        d_enc: int,
        *,
        num_heads: int = 8,
        depth: int = 1,
        mlp_ratio: int = 4,
        eps: float = 1e-6,
        null_summary: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.d_enc, self.dtype = d_enc, dtype
        # Small, like BERT/Q-former embeddings: each block normalises its queries first.
        init = nnx.initializers.normal(0.02)
        self.queries = nnx.Param(init(rngs.params(), (n_styles, n_queries, d_enc), param_dtype))
        self.blocks = nnx.List(
            [
                AttentionBlock(
                    d_enc,
                    d_enc,
                    num_heads,
                    mlp_dim=mlp_ratio * d_enc,
                    eps=eps,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                )
                for _ in range(depth)
            ]
        )
        # Drawn last, so that the other parameters start as they would without it.
        shape = (n_queries, d_enc)
        self.null = nnx.Param(init(rngs.params(), shape, param_dtype)) if null_summary else None

    def __call__(
        self,
        context: jax.Array,  # [batch, n_ctx, d_enc] utterance embeddings, oldest first
        context_mask: jax.Array | None,  # [batch, n_ctx] bool, True on real utterances
        style_ids: jax.Array,  # [batch] int
    ) -> jax.Array:  # [batch, n_queries, d_enc]
        chex.assert_rank(context, 3)
        chex.assert_axis_dimension(context, 2, self.d_enc)
        chex.assert_shape(style_ids, context.shape[:1])
        if context_mask is not None:
            chex.assert_shape(context_mask, context.shape[:2])
        x = self.queries[...][style_ids].astype(self.dtype)  # [batch, n_queries, d_enc]
        context = context.astype(self.dtype)
        for block in self.blocks:
            x = block(x, context, context_mask)
        return x

    def each(
        self,
        context: jax.Array,  # [batch, n_ctx, d_enc]
        context_mask: jax.Array | None,  # [batch, n_ctx] bool
    ) -> jax.Array:  # [n_styles, batch, n_queries, d_enc]
        """Every style's summary of every row, in one call (the rows repeated per style)."""
        n, batch = self.queries[...].shape[0], context.shape[0]
        styles = jnp.repeat(jnp.arange(n, dtype=jnp.int32), batch)  # [n * batch]
        tile = lambda a: None if a is None else jnp.tile(a, (n,) + (1,) * (a.ndim - 1))
        x = self(tile(context), tile(context_mask), styles)
        return x.reshape(n, batch, *x.shape[1:])

    def null_like(self, x: jax.Array) -> jax.Array:
        """The null summary broadcast to the shape of summaries x [..., n_queries, d_enc]."""
        if self.null is None:
            raise ValueError("this summary has no null summary (trained without dropout)")
        return jnp.broadcast_to(self.null[...].astype(x.dtype), x.shape)
