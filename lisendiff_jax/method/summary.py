"""The style-aware context summary x = Attn(q^(s), X): learned queries per style read the
embeddings of the context utterances (a Q-former-like summary, paper eq. 7).

Only the queries are per style; the attention and MLP weights are shared, so both styles read
the context the same way and differ in what they ask of it.
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

    Parameters: `queries` [n_styles, n_queries, d_enc] and `blocks.{j}.*`.
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
