"""Cross-attention: queries attend to a small set of vectors.

Three layers, from the primitive up:
- `masked_attention`: multi-head scaled dot-product attention over a padded key set (pure).
- `MultiHeadCrossAttention`, `AttentionBlock`: the projections, and a pre-norm attention + MLP
  block with residuals. The style summary and the denoiser are stacks of such blocks.
- `CrossAttention` and `attach_cross_attention`: the module that lets the backbone's hidden
  states attend to the latent set, placed after self-attention in the last N decoder layers.

Attention scores and softmax are float32 whatever the compute dtype.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from lisendiff_jax.backbone.model import MASKED_SCORE, Decoder, RMSNorm


def masked_attention(
    q: jax.Array,  # [batch, t, heads, head_dim]
    k: jax.Array,  # [batch, l, heads, head_dim]
    v: jax.Array,  # [batch, l, heads, head_dim]
    mask: jax.Array | None,  # [batch, l] or per query [batch, t, l] bool, True on real keys
) -> jax.Array:
    """Attention output [batch, t, heads, head_dim]; a query with no real key gets zeros."""
    scores = jnp.einsum("bthd,blhd->bhtl", q, k, preferred_element_type=jnp.float32)
    scores = scores * q.shape[-1] ** -0.5
    if mask is None:
        probs = jax.nn.softmax(scores, axis=-1)
    else:
        mask = mask.astype(jnp.bool_)
        # [batch, 1, 1 or t, l]: one key set for every query, or each query its own.
        allowed = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None, :, :]
        probs = jax.nn.softmax(jnp.where(allowed, scores, MASKED_SCORE), axis=-1)
        # Zeroing (rather than only masking scores) is what makes an empty key set contribute
        # nothing instead of the mean of its padding.
        probs = jnp.where(allowed, probs, 0.0)
    return jnp.einsum("bhtl,blhd->bthd", probs.astype(v.dtype), v)


class MultiHeadCrossAttention(nnx.Module):
    """Projections around `masked_attention`: queries [.., query_dim] read keys/values
    [.., kv_dim] through `inner_dim` channels split into `num_heads` heads.

    With `zero_init_output` the output projection starts at zero, so the module's first
    output is exactly zero whatever its inputs.

    With `one_key` the key set always holds a single vector. Softmax over one key is 1 whatever
    the scores, so every query receives that key's value: the module has no q/k projections
    (they could never get a gradient) and computes o_proj(v_proj(key)) once per row,
    broadcast over the queries (zero for a row whose key is masked), exactly what attention
    over one key computes. A per-query mask [batch, t, l] that allows each query at most one
    key (a packed row's token its own segment's latent) is one key per query: each query gets
    its key's value, or zero.
    """

    def __init__(
        self,
        query_dim: int,
        kv_dim: int,
        inner_dim: int,
        num_heads: int,
        *,
        zero_init_output: bool = False,
        one_key: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if inner_dim % num_heads:
            raise ValueError(
                f"inner_dim ({inner_dim}) must be a multiple of num_heads ({num_heads})"
            )
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if one_key:
            self.q_proj = self.k_proj = None
        else:
            self.q_proj = nnx.Linear(query_dim, inner_dim, **kw)
            self.k_proj = nnx.Linear(kv_dim, inner_dim, **kw)
        self.v_proj = nnx.Linear(kv_dim, inner_dim, **kw)
        out_init = nnx.initializers.zeros if zero_init_output else nnx.initializers.lecun_normal()
        self.o_proj = nnx.Linear(inner_dim, query_dim, kernel_init=out_init, **kw)
        self.num_heads = num_heads

    def __call__(
        self,
        queries: jax.Array,  # [batch, t, query_dim]
        keys_values: jax.Array,  # [batch, l, kv_dim]
        mask: jax.Array | None = None,  # [batch, l] or per query [batch, t, l] bool
    ) -> jax.Array:  # [batch, t, query_dim]
        b, t, _ = queries.shape
        n_kv = keys_values.shape[1]
        if self.q_proj is None and mask is not None and mask.ndim == 3:
            chex.assert_shape(mask, (b, t, n_kv))
            value = self.o_proj(self.v_proj(keys_values))  # [batch, l, query_dim]
            # A gather rather than a one-hot product: the value read exactly as one key gives.
            picked = jnp.take_along_axis(value, jnp.argmax(mask, axis=-1)[..., None], axis=1)
            return jnp.where(mask.any(axis=-1, keepdims=True), picked, 0)
        if self.q_proj is None:  # one key: the same value for every query (queries unread)
            chex.assert_axis_dimension(keys_values, 1, 1)
            value = self.o_proj(self.v_proj(keys_values))  # [batch, 1, query_dim]
            if mask is not None:
                value = jnp.where(mask.astype(jnp.bool_)[:, :, None], value, 0)
            return jnp.broadcast_to(value, (b, t, value.shape[-1]))
        q = self.q_proj(queries).reshape(b, t, self.num_heads, -1)
        k = self.k_proj(keys_values).reshape(b, n_kv, self.num_heads, -1)
        v = self.v_proj(keys_values).reshape(b, n_kv, self.num_heads, -1)
        return self.o_proj(masked_attention(q, k, v, mask).reshape(b, t, -1))


class FeedForward(nnx.Module):
    """in_dim -> hidden_dim -> out_dim with a GELU between."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc_in = nnx.Linear(in_dim, hidden_dim, **kw)
        self.fc_out = nnx.Linear(hidden_dim, out_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc_out(jax.nn.gelu(self.fc_in(x)))


class AttentionBlock(nnx.Module):
    """Pre-norm block: h = q + Attn(LN(q), LN(kv)); h = h + MLP(LN(h)) (no MLP if mlp_dim is 0).

    LayerNorm rather than RMSNorm: sentence embeddings are not centred, and centring the key
    set keeps attention from being dominated by the shared mean direction.
    """

    def __init__(
        self,
        dim: int,
        kv_dim: int,
        num_heads: int,
        *,
        inner_dim: int | None = None,
        mlp_dim: int = 0,
        eps: float = 1e-6,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query_norm = nnx.LayerNorm(dim, epsilon=eps, **kw)
        self.kv_norm = nnx.LayerNorm(kv_dim, epsilon=eps, **kw)
        self.attn = MultiHeadCrossAttention(dim, kv_dim, inner_dim or dim, num_heads, **kw)
        if mlp_dim:
            self.mlp_norm = nnx.LayerNorm(dim, epsilon=eps, **kw)
            self.mlp = FeedForward(dim, mlp_dim, dim, **kw)
        else:
            self.mlp_norm = self.mlp = None

    def __call__(
        self,
        queries: jax.Array,  # [batch, t, dim]
        keys_values: jax.Array,  # [batch, l, kv_dim]
        mask: jax.Array | None = None,  # [batch, l] bool
    ) -> jax.Array:  # [batch, t, dim]
        h = queries + self.attn(self.query_norm(queries), self.kv_norm(keys_values), mask)
        if self.mlp is not None:
            h = h + self.mlp(self.mlp_norm(h))
        return h


class CrossAttention(nnx.Module):
    """The backbone's latent reader: hidden states [batch, seq, hidden] attend to the latent set
    [batch, L, latent_dim]; the decoder layer adds the result to its residual stream.

    Queries come from RMS-normed hidden states (the backbone's own norm), keys/values from
    layer-normed latents. The output projection is zero-initialised, so a freshly attached
    module changes nothing: the model starts as the backbone exactly.

    The module is built for a set of `num_latents` latents (L). With L = 1 (the encoder's one
    pooled vector) the softmax over the single key is 1 whatever the scores, so the output is
    o_proj(v_proj(LN(latent))) at every position: that is all the module computes, once per
    row, and it has no query norm and no q/k projections, which would never get a gradient.

    Packed rows (several examples in one row, `segment_ids` [batch, seq] numbering them 1..K,
    0 on padding) bring one latent set per segment, [batch, K, L, latent_dim]; each token reads
    its own segment's set only (a padding token reads none). The K sets are flattened into one
    key set of K * L with a per-token mask, so each token computes what it would alone in its
    row.

    `inner_dim` (default hidden_size) sets the attention width, and with it the cost. Per layer
    there are hidden*inner + latent_dim*inner projection weights (v, o) for L = 1, twice that
    (q, k, v, o) for L > 1. Llama-3.1-8B (hidden 4096, latent 768), 12 layers, with fp32
    parameters, gradients and two Adam moments (16 bytes per parameter), on top of the 15 GiB
    bf16 backbone: inner 4096 -> 239M parameters, 3.6 GiB (L > 1: 478M, 7.1 GiB, too much for
    24 GB); inner 1024 -> 60M parameters, 0.9 GiB (L > 1: 120M, 1.8 GiB).
    """

    def __init__(
        self,
        hidden_size: int,
        latent_dim: int,
        inner_dim: int | None = None,
        num_heads: int = 8,
        *,
        num_latents: int = 1,
        norm_eps: float = 1e-6,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {num_latents}")
        self.hidden_size, self.latent_dim = hidden_size, latent_dim
        self.num_latents = num_latents
        one_key = num_latents == 1
        self.norm = None if one_key else RMSNorm(hidden_size, norm_eps, param_dtype=param_dtype)
        self.latent_norm = nnx.LayerNorm(
            latent_dim, epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.attn = MultiHeadCrossAttention(
            hidden_size,
            latent_dim,
            inner_dim or hidden_size,
            num_heads,
            zero_init_output=True,
            one_key=one_key,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(
        self,
        x: jax.Array,  # [batch, seq, hidden] in the backbone's compute dtype
        latents: jax.Array,  # [batch, L, latent_dim] float32
        latent_mask: jax.Array | None = None,  # [batch, L] bool, True on real latents
        segment_ids: jax.Array | None = None,  # [batch, seq] int32: packed latents [b, K, L, d]
    ) -> jax.Array:  # [batch, seq, hidden] in x's dtype
        packed = segment_ids is not None
        chex.assert_rank([x, latents], [3, 4 if packed else 3])
        chex.assert_axis_dimension(x, 2, self.hidden_size)
        chex.assert_axis_dimension(latents, -1, self.latent_dim)
        chex.assert_axis_dimension(
            latents,
            -2,
            self.num_latents,
            custom_message="latents [batch, (K,) L, d]: this cross-attention was built for "
            f"L = model.cross_attention.num_latents = {self.num_latents}",
        )
        chex.assert_equal_shape_prefix([x, latents], 1)
        if latent_mask is not None:
            chex.assert_shape(latent_mask, latents.shape[:-1])
        if packed:
            chex.assert_shape(segment_ids, x.shape[:2])
            b, k, n, d = latents.shape
            key_segment = jnp.repeat(jnp.arange(1, k + 1, dtype=segment_ids.dtype), n)  # [K*L]
            per_token = segment_ids[:, :, None] == key_segment  # [batch, seq, K*L]
            if latent_mask is not None:
                per_token &= latent_mask.astype(jnp.bool_).reshape(b, 1, k * n)
            latents, latent_mask = latents.reshape(b, k * n, d), per_token
        queries = x if self.norm is None else self.norm(x)  # one latent: only x's shape is read
        out = self.attn(queries, self.latent_norm(latents), latent_mask)
        return out.astype(x.dtype)


def attach_cross_attention(
    model: Decoder,
    last_n: int = 12,
    latent_dim: int = 768,
    inner_dim: int | None = None,
    num_heads: int | None = None,
    *,
    num_latents: int = 1,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> Decoder:
    """Sets `layer.cross_attn` on the last `last_n` decoder layers, in place; returns `model`.

    Parameters land at `layers.{i}.cross_attn.{latent_norm.{scale,bias},
    attn.{v,o}_proj.kernel}`, and for `num_latents` > 1 also at `norm.scale` and
    `attn.{q,k}_proj.kernel` (see `CrossAttention`). Computation is in the backbone's dtype.
    `num_heads` defaults to inner_dim / the backbone's head_dim, so heads keep the backbone's
    width.
    """
    cfg = model.config
    if not 1 <= last_n <= cfg.num_layers:
        raise ValueError(
            f"last_n={last_n} cross-attention layers requested, but the backbone has "
            f"num_layers={cfg.num_layers}; last_n must be in [1, {cfg.num_layers}]"
        )
    inner_dim = inner_dim or cfg.hidden_size
    if num_heads is None:
        if inner_dim % cfg.head_dim:
            raise ValueError(
                f"inner_dim ({inner_dim}) is not a multiple of the backbone's head_dim "
                f"({cfg.head_dim}); pass num_heads explicitly"
            )
        num_heads = inner_dim // cfg.head_dim
    for i in range(cfg.num_layers - last_n, cfg.num_layers):
        layer = model.layers[i]
        if layer.cross_attn is not None:
            raise ValueError(f"decoder layer {i} already has a cross-attention module")
        layer.cross_attn = CrossAttention(
            cfg.hidden_size,
            latent_dim,
            inner_dim,
            num_heads,
            num_latents=num_latents,
            norm_eps=cfg.rms_norm_eps,
            dtype=model.dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
    return model
