"""LisenDiff: the backbone with LoRA and cross-attention, the style summary and the denoisers.

Which parameters train is decided here, in one filter (`trainable_filter`): the LoRA
adapters, every LisenDiff module, and the LM head when configured. Everything else is the
frozen backbone. A latent travels one way: the encoder cache gives y0; training feeds y0 to
the cross-attention (L_LM) and its standardised form to the diffusion loss (L_diff).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lisendiff_jax.backbone.config import BackboneConfig
from lisendiff_jax.backbone.model import Decoder
from lisendiff_jax.data.example import STYLES
from lisendiff_jax.errors import UserError
from lisendiff_jax.method.cross_attention import attach_cross_attention
from lisendiff_jax.method.denoiser import DenoiserConfig, StyleDenoisers
from lisendiff_jax.method.diffusion import (
    LatentStats,
    Schedule,
    make_schedule,
    q_sample,
    standardise,
    x0_loss,
)
from lisendiff_jax.method.lora import apply_lora
from lisendiff_jax.method.objectives import token_nll
from lisendiff_jax.method.summary import StyleSummary

# Modules whose every parameter trains; LoRA adapters are picked by type.
TRAINABLE_MODULES = ("cross_attn", "summary", "denoisers")


class LatentStat(nnx.Variable):
    """Latent standardisation statistics: model state that is saved but never trained."""


class ModelSettingsError(UserError, ValueError):
    """Settings the chosen backbone cannot take; the message names the option."""


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
    num_steps: int = 50
    beta_start: float = 0.001
    beta_end: float = 0.02
    schedule: str = "linear"
    loss_weight: str = "uniform"

    def make(self) -> Schedule:
        return make_schedule(self.schedule, self.num_steps, self.beta_start, self.beta_end)


class LisenDiff(nnx.Module):
    """`backbone` is adapted in place: LoRA on the configured projections and, unless
    `cfg.lisendiff` is False (the LoRA-only baseline), cross-attention in its last layers."""

    def __init__(
        self,
        backbone: Decoder,
        cfg: ml_collections.ConfigDict,  # the experiment's `model` section
        latent_dim: int,
        *,
        rngs: nnx.Rngs,
    ):
        check_settings(backbone.config, cfg)
        trainable_dtype = jnp.dtype(cfg.trainable_dtype)
        self.lisendiff = bool(cfg.lisendiff)
        self.latent_dim = latent_dim
        self.num_latents = int(cfg.cross_attention.num_latents)  # L of a latent set [L, d]
        self.train_lm_head = bool(cfg.train_lm_head)
        self.backbone = apply_lora(
            backbone,
            tuple(cfg.lora.targets),
            cfg.lora.rank,
            cfg.lora.alpha,
            cfg.lora.dropout,
            param_dtype=trainable_dtype,
            rngs=rngs,
        )
        self.diffusion = DiffusionSettings(**cfg.diffusion.to_dict())
        self.latent_mean = LatentStat(jnp.zeros((latent_dim,), jnp.float32))
        self.latent_scale = LatentStat(jnp.ones((), jnp.float32))
        # Probability that training replaces an example's context summary by the learned
        # null summary (classifier-free guidance); 0, the paper's training, builds no null.
        self.context_dropout = float(cfg.denoiser.context_dropout)
        if not self.lisendiff:
            self.summary = self.denoisers = None
            return
        ca = cfg.cross_attention
        attach_cross_attention(
            self.backbone,
            ca.last_n_layers,
            latent_dim,
            ca.inner_dim or None,
            ca.num_heads,
            num_latents=ca.num_latents,
            param_dtype=trainable_dtype,
            rngs=rngs,
        )
        self.summary, self.denoisers = context_modules(
            cfg, latent_dim, self.context_dropout > 0, trainable_dtype, rngs
        )

    @property
    def latent_stats(self) -> LatentStats:
        return LatentStats(mean=self.latent_mean[...], scale=self.latent_scale[...])

    def set_latent_stats(self, stats: LatentStats) -> None:
        self.latent_mean.set_value(jnp.asarray(stats.mean, jnp.float32))
        self.latent_scale.set_value(jnp.asarray(stats.scale, jnp.float32))

    def trainable_filter(self) -> nnx.filterlib.Filter:
        """Selects the trainable parameters of this model (see the module docstring)."""
        train_head = self.train_lm_head

        def is_trainable(path: tuple, variable: object) -> bool:
            if isinstance(variable, nnx.LoRAParam):
                return True
            if not isinstance(variable, nnx.Param):
                return False
            if any(part in TRAINABLE_MODULES for part in path):
                return True
            return train_head and path[:2] == ("backbone", "lm_head")

        return is_trainable

    def losses(
        self, batch: dict[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """L = L_LM + L_diff for one batch (L_diff is 0 for the LoRA-only baseline).

        `batch` holds input_ids, attention_mask, loss_mask [B, T]; row_mask, style_id [B];
        response_latent [B, L, d]; context_embeddings [B, n_ctx, d], context_mask [B, n_ctx].
        A packed batch (data.batching.collate_packed: K examples per row) has instead
        segment_ids, positions [B, T]; segment_mask, style_id [B, K]; response_latent
        [B, K, L, d]; context_embeddings [B, K, n_ctx, d], context_mask [B, K, n_ctx].
        """
        ids = batch["input_ids"]
        chex.assert_rank(ids, 2)
        segment_ids = batch.get("segment_ids")  # [B, T], packed rows only
        latents = batch["response_latent"].astype(jnp.float32)  # [B, (K,) L, d]
        chex.assert_shape(latents, (ids.shape[0], *[None] * (latents.ndim - 2), self.latent_dim))
        hidden, _ = self.backbone.hidden_states(
            ids,
            batch["attention_mask"],
            positions=batch.get("positions"),
            latents=latents if self.lisendiff else None,
            segment_ids=segment_ids,
        )
        # Position i predicts token i + 1; loss_mask marks the response tokens themselves.
        weights = batch["loss_mask"][:, 1:].astype(jnp.float32)
        if segment_ids is not None:  # no prediction across a segment boundary
            weights *= segment_ids[:, 1:] == segment_ids[:, :-1]
        backbone = self.backbone
        nll = token_nll(
            hidden[:, :-1], backbone.head_matrix(), ids[:, 1:], weights, dtype=backbone.dtype
        )
        lm_loss = nll / jnp.maximum(weights.sum(), 1.0)
        if not self.lisendiff:
            return lm_loss, {"lm_loss": lm_loss, "diff_loss": jnp.zeros(())}

        diff_loss = diffusion_loss(
            self.summary,
            self.denoisers,
            self.diffusion,
            self.latent_stats,
            batch,
            rng,
            self.context_dropout,
        )
        return lm_loss + diff_loss, {"lm_loss": lm_loss, "diff_loss": diff_loss}


def context_modules(
    cfg: ml_collections.ConfigDict,  # the experiment's `model` section
    latent_dim: int,
    null_summary: bool,
    param_dtype: jnp.dtype,
    rngs: nnx.Rngs,
) -> tuple[StyleSummary, StyleDenoisers]:
    """The style summary and the denoisers: the diffusion half of LisenDiff, which never sees
    the LLM (the diffusion probe trains it alone)."""
    summary = StyleSummary(
        len(STYLES),
        cfg.summary.num_queries,
        latent_dim,
        num_heads=cfg.summary.num_heads,
        depth=cfg.summary.depth,
        mlp_ratio=cfg.summary.mlp_ratio,
        null_summary=null_summary,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    denoisers = StyleDenoisers(
        len(STYLES),
        DenoiserConfig(
            d_enc=latent_dim,
            num_heads=cfg.denoiser.num_heads,
            depth=cfg.denoiser.depth,
            mlp_ratio=cfg.denoiser.mlp_ratio,
        ),
        param_dtype=param_dtype,
        rngs=rngs,
    )
    return summary, denoisers


def diffusion_loss(
    summary: StyleSummary,
    denoisers: StyleDenoisers,
    settings: DiffusionSettings,
    stats: LatentStats,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    context_dropout: float = 0.0,
) -> jax.Array:
    """L_diff of one batch (the keys `LisenDiff.losses` names; no token arrays needed): the x0
    loss of each row's style denoiser at a random step, on standardised latents. A packed
    batch's examples are its B x K segment slots, weighted by `segment_mask`."""
    if "segment_mask" in batch:  # packed: [B, K, ...] -> [B*K, ...], one example per slot
        keys = ("response_latent", "style_id", "context_embeddings", "context_mask", "segment_mask")
        flat = {k: batch[k].reshape(-1, *batch[k].shape[2:]) for k in keys}
        batch = dict(flat, row_mask=flat.pop("segment_mask"))
    latents = batch["response_latent"].astype(jnp.float32)  # [B, L, d]
    style = batch["style_id"]  # [B]
    schedule = settings.make()
    t_key, noise_key = jax.random.split(rng)
    y0 = standardise(stats, latents)
    t = jax.random.randint(t_key, style.shape, 0, schedule.num_steps)
    y_t = q_sample(schedule, y0, t, jax.random.normal(noise_key, y0.shape))
    x = summary(batch["context_embeddings"], batch["context_mask"], style)
    if context_dropout > 0:
        # fold_in, not a third split: the t and noise keys stay those of p = 0.
        drop = jax.random.bernoulli(jax.random.fold_in(rng, 1), context_dropout, style.shape)
        x = jnp.where(drop[:, None, None], summary.null_like(x), x)  # drop: [B]
    return x0_loss(
        schedule,
        denoisers(y_t, t, x, style),
        y0,
        t,
        weighting=settings.loss_weight,
        mask=batch["row_mask"].astype(bool),
    )


class TrainingSplit(NamedTuple):
    """A model taken apart for a jitted train step (see `training_loss`)."""

    graphdef: nnx.GraphDef
    trainable: nnx.State  # differentiated and updated
    frozen: tuple[nnx.State, nnx.State, nnx.State]  # latent stats, dropout streams, the rest


def split_for_training(model: LisenDiff) -> TrainingSplit:
    """Switches `model` to train mode (dropout on) and splits it for `training_loss`."""
    model.train()
    graphdef, trainable, stats, streams, rest = nnx.split(
        model, model.trainable_filter(), LatentStat, nnx.RngState, ...
    )
    return TrainingSplit(graphdef, trainable, (stats, streams, rest))


def training_loss(
    graphdef: nnx.GraphDef,
    trainable: nnx.State,
    frozen: tuple[nnx.State, nnx.State, nnx.State],
    batch: dict[str, jax.Array],
    rng: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`LisenDiff.losses` of the merged model, with dropout streams drawn from `rng`: the
    loss function of `train_step.make_train_step` for a `split_for_training` split."""
    stats, streams, rest = frozen
    dropout_key, diffusion_key = jax.random.split(rng)
    # Fresh dropout streams from this step's key (one per stream), built as new values rather
    # than by reseeding in place, which NNX forbids inside the gradient's trace.
    leaves, treedef = jax.tree.flatten(streams)
    fresh = [
        jax.random.fold_in(dropout_key, i)
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        else jnp.zeros_like(leaf)
        for i, leaf in enumerate(leaves)
    ]
    model = nnx.merge(graphdef, trainable, stats, jax.tree.unflatten(treedef, fresh), rest)
    return model.losses(batch, diffusion_key)


def check_settings(bc: BackboneConfig, cfg: ml_collections.ConfigDict) -> None:
    """Errors naming the option; needs only the backbone's config, so training calls it
    before loading any weights."""
    if cfg.train_lm_head and bc.tie_word_embeddings:
        raise ModelSettingsError(
            "--config.model.train_lm_head: this backbone ties its LM head to the input "
            "embeddings; training it would train the embeddings too (set it to False)"
        )
    if cfg.lisendiff:
        n = cfg.cross_attention.last_n_layers
        if n > bc.num_layers:
            raise ModelSettingsError(
                f"--config.model.cross_attention.last_n_layers: {n} exceeds the backbone's "
                f"{bc.num_layers} layers"
            )
        inner = cfg.cross_attention.inner_dim or bc.hidden_size
        if inner % cfg.cross_attention.num_heads:
            raise ModelSettingsError(
                f"--config.model.cross_attention.inner_dim: {inner} is not a multiple of "
                f"num_heads={cfg.cross_attention.num_heads}"
            )
