"""Style-specific denoisers f_s(y_t, t, x) -> y0_hat (paper eq. 9 and appendix B).

The paper's denoiser is one attention layer: the noised latent y_t queries the key/value set
[t_emb; x], the timestep embedding followed by the context summary. Here the attention sits in
a pre-norm block with an MLP (`mlp_ratio=0` drops it), `depth` such blocks are stacked, and a
final norm and projection map back to d_enc.

`StyleDenoisers` holds one denoiser per style as a single module whose parameters carry a
leading [n_styles] axis (built with `nnx.vmap`). It runs every style's denoiser on the whole
batch and keeps, per example, the output of its own style. That costs n_styles times the
denoiser's FLOPs and activations (2x for the paper's two styles, and the denoiser is tiny next
to the LLM) but never copies parameters; gathering parameters per example instead would
materialise batch x parameters. Gradients reach a style only through its own examples.
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from lisendiff_jax.method.cross_attention import AttentionBlock, FeedForward


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal features [batch, dim] (float32) of integer steps t [batch]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [batch, half]
    emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
    """Shape of one denoiser. Defaults: one pre-norm attention block with an MLP of width
    4 * d_enc, more than the paper's single attention layer (docs/decisions.md says why)."""

    d_enc: int = 768
    num_heads: int = 8
    depth: int = 1
    width: int | None = None  # attention inner width; None = d_enc
    mlp_ratio: int = 4  # MLP width = mlp_ratio * d_enc; 0 = attention only
    time_dim: int = 128  # sinusoidal features before the timestep MLP
    eps: float = 1e-6


class Denoiser(nnx.Module):
    """One style's f(y_t, t, x): y_t [batch, L, d_enc] attends to [t_emb; x] -> y0_hat."""

    def __init__(
        self,
        config: DenoiserConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        d = config.d_enc
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config, self.dtype = config, dtype
        self.time_mlp = FeedForward(config.time_dim, d, d, **kw)
        self.blocks = nnx.List(
            [
                AttentionBlock(
                    d,
                    d,
                    config.num_heads,
                    inner_dim=config.width,
                    mlp_dim=config.mlp_ratio * d,
                    eps=config.eps,
                    **kw,
                )
                for _ in range(config.depth)
            ]
        )
        self.out_norm = nnx.LayerNorm(d, epsilon=config.eps, **kw)
        self.out_proj = nnx.Linear(d, d, **kw)

    def __call__(
        self,
        y_t: jax.Array,  # [batch, L, d_enc] noised latent
        t: jax.Array,  # [batch] int, 0-based step
        x: jax.Array,  # [batch, n_queries, d_enc] context summary
    ) -> jax.Array:  # [batch, L, d_enc] predicted y0
        chex.assert_rank([y_t, x], 3)
        chex.assert_axis_dimension(y_t, 2, self.config.d_enc)
        chex.assert_axis_dimension(x, 2, self.config.d_enc)
        chex.assert_equal_shape_prefix([y_t, x], 1)
        chex.assert_shape(t, y_t.shape[:1])
        t_emb = self.time_mlp(timestep_embedding(t, self.config.time_dim).astype(self.dtype))
        keys_values = jnp.concatenate([t_emb[:, None], x.astype(self.dtype)], axis=1)
        h = y_t.astype(self.dtype)
        for block in self.blocks:
            h = block(h, keys_values)
        return self.out_proj(self.out_norm(h))


class StyleDenoisers(nnx.Module):
    """n_styles denoisers with stacked parameters; each example uses its style's denoiser.

    Parameters live at `stacked.*` with a leading [n_styles] axis (e.g.
    `stacked.blocks.0.attn.q_proj.kernel` [n_styles, d_enc, width]).
    """

    def __init__(
        self,
        n_styles: int,
        config: DenoiserConfig,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.n_styles = n_styles

        @nnx.split_rngs(splits=n_styles)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs: nnx.Rngs) -> Denoiser:
            return Denoiser(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.stacked = make(rngs)

    def __call__(
        self,
        y_t: jax.Array,  # [batch, L, d_enc]
        t: jax.Array,  # [batch] int
        x: jax.Array,  # [batch, n_queries, d_enc]
        style_ids: jax.Array,  # [batch] int in [0, n_styles)
    ) -> jax.Array:  # [batch, L, d_enc]
        chex.assert_shape(style_ids, y_t.shape[:1])
        every = self._every(y_t, t, x, x_axis=None)  # [n_styles, batch, L, d_enc]
        return every[style_ids, jnp.arange(y_t.shape[0])]

    def each(
        self,
        y_t: jax.Array,  # [batch, L, d_enc]
        t: jax.Array,  # [batch] int
        xs: jax.Array,  # [n_styles, batch, n_queries, d_enc]: style s reads xs[s]
    ) -> jax.Array:  # [n_styles, batch, L, d_enc]
        """Every style's prediction from its own summary, in one call: what the sampler's
        dial mixes. The same FLOPs as `__call__`, which runs every style on one summary."""
        chex.assert_axis_dimension(xs, 0, self.n_styles)
        return self._every(y_t, t, xs, x_axis=0)

    def _every(self, y_t: jax.Array, t: jax.Array, x: jax.Array, x_axis: int | None):
        graphdef, state = nnx.split(self.stacked)
        run = lambda s, x: nnx.merge(graphdef, s)(y_t, t, x)
        return jax.vmap(run, in_axes=(0, x_axis))(state, x)

    def for_style(self, style: int) -> Denoiser:
        """A standalone copy of one style's denoiser (unstacked parameters)."""
        if not 0 <= style < self.n_styles:
            raise ValueError(f"style {style} out of range for {self.n_styles} styles")
        graphdef, state = nnx.split(self.stacked)
        return nnx.merge(graphdef, jax.tree.map(lambda p: p[style], state))
