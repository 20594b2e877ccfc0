"""Gaussian diffusion on latents: schedules, forward noising, the x0 loss, latent statistics.

Pure functions and pytrees only. Timesteps are 0-based indices: `t` in [0, T) stands for the
paper's step t + 1, so `schedule.alpha_bars[t]` is the paper's alpha_bar_{t+1} and
`alpha_bars[T - 1]` is alpha_bar_T.

The paper's schedule (linear betas 0.001 -> 0.02, T = 50) ends at alpha_bar_T = 0.5894: the
last step keeps sqrt(0.589) = 77% of the signal, so sampling from pure noise starts off the
training distribution. "zero_terminal_snr" rescales the same betas to end at alpha_bar_T = 0
(Lin et al., 2024); "cosine" is Nichol & Dhariwal's schedule.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

ScheduleName = Literal["linear", "cosine", "zero_terminal_snr"]
Weighting = Literal["uniform", "snr", "min_snr"]


@struct.dataclass
class Schedule:
    """Per-step coefficients, each [T] float32, indexed by the 0-based step t."""

    betas: jax.Array
    alphas: jax.Array  # 1 - beta_t
    alpha_bars: jax.Array  # prod_{s <= t} alpha_s
    alpha_bars_prev: jax.Array  # alpha_bar_{t-1}, 1 at t = 0
    # q(y_{t-1} | y_t, y0) = N(coef_y0 * y0 + coef_yt * y_t, posterior_variance).
    posterior_mean_coef_y0: jax.Array
    posterior_mean_coef_yt: jax.Array
    posterior_variance: jax.Array  # 0 at t = 0: the last sampling step is deterministic
    # log of the variance with t = 0 replaced by t = 1, finite for samplers that need the log.
    posterior_log_variance_clipped: jax.Array
    name: str = struct.field(pytree_node=False, default="linear")

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    @property
    def alpha_bar_T(self) -> jax.Array:
        """How much signal variance survives the last step; log it as a float."""
        return self.alpha_bars[-1]

    @property
    def snr(self) -> jax.Array:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) per step [T] (inf if 1 - abar = 0)."""
        return self.alpha_bars / (1.0 - self.alpha_bars)


def linear_betas(num_steps: int, beta_start: float, beta_end: float) -> np.ndarray:
    return np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    steps = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    f = np.cos((steps + offset) / (1 + offset) * np.pi / 2) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(alpha_bar) so that it ends at 0 and keeps its first value."""
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_schedule(
    name: ScheduleName = "linear",
    num_steps: int = 50,
    beta_start: float = 0.001,
    beta_end: float = 0.02,
) -> Schedule:
    """The paper's schedule by default; `beta_start`/`beta_end` apply to linear and its
    zero-terminal-SNR rescaling. Coefficients are derived in float64 and stored as float32."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if name == "linear":
        betas = linear_betas(num_steps, beta_start, beta_end)
    elif name == "cosine":
        betas = cosine_betas(num_steps)
    elif name == "zero_terminal_snr":
        betas = rescale_zero_terminal_snr(linear_betas(num_steps, beta_start, beta_end))
    else:
        raise ValueError(
            f"unknown schedule {name!r}; choose one of linear, cosine, zero_terminal_snr"
        )
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError(f"schedule {name!r} gives betas outside (0, 1]")
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    one_minus_abar = 1.0 - abar  # > 0 for every step, since beta_t > 0
    variance = betas * (1.0 - abar_prev) / one_minus_abar
    log_variance = np.log(np.concatenate([variance[1:2], variance[1:]]))
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return Schedule(
        betas=f32(betas),
        alphas=f32(alphas),
        alpha_bars=f32(abar),
        alpha_bars_prev=f32(abar_prev),
        posterior_mean_coef_y0=f32(betas * np.sqrt(abar_prev) / one_minus_abar),
        posterior_mean_coef_yt=f32((1.0 - abar_prev) * np.sqrt(alphas) / one_minus_abar),
        posterior_variance=f32(variance),
        posterior_log_variance_clipped=f32(log_variance),
        name=name,
    )


def _per_example(values: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
    """values[t] [batch] shaped to broadcast against `like` [batch, ...]."""
    return values[t].reshape((-1,) + (1,) * (like.ndim - 1))


def q_sample(schedule: Schedule, y0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """y_t = sqrt(abar_t) y0 + sqrt(1 - abar_t) noise; y0, noise [batch, ...], t [batch] int."""
    chex.assert_equal_shape([y0, noise])
    chex.assert_shape(t, (y0.shape[0],))
    abar = _per_example(schedule.alpha_bars, t, y0)
    return jnp.sqrt(abar) * y0 + jnp.sqrt(1.0 - abar) * noise


def q_posterior(
    schedule: Schedule, y0: jax.Array, y_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Mean [batch, ...] and variance [batch] of q(y_{t-1} | y_t, y0)."""
    chex.assert_equal_shape([y0, y_t])
    mean = (
        _per_example(schedule.posterior_mean_coef_y0, t, y0) * y0
        + _per_example(schedule.posterior_mean_coef_yt, t, y_t) * y_t
    )
    return mean, schedule.posterior_variance[t]


def loss_weights(
    schedule: Schedule, t: jax.Array, weighting: Weighting = "uniform", gamma: float = 5.0
) -> jax.Array:
    """lambda_t [batch] for the x0 loss.

    "uniform": 1 (the paper's plain x0 regression). "snr": SNR_t, which makes the x0 loss equal
    the epsilon-prediction loss. "min_snr": min(SNR_t, gamma) (Hang et al., 2023), the SNR
    weighting with its near-clean steps capped.
    """
    snr = schedule.snr[t]
    if weighting == "uniform":
        return jnp.ones_like(snr)
    if weighting == "snr":
        return snr
    if weighting == "min_snr":
        return jnp.minimum(snr, gamma)
    raise ValueError(f"unknown loss weighting {weighting!r}; choose one of uniform, snr, min_snr")


def x0_loss(
    schedule: Schedule,
    y0_pred: jax.Array,  # [batch, L, d]
    y0: jax.Array,  # [batch, L, d]
    t: jax.Array,  # [batch] int
    *,
    weighting: Weighting = "uniform",
    gamma: float = 5.0,
    mask: jax.Array | None = None,  # [batch] or [batch, L], True on real rows / latents
) -> jax.Array:
    """Weighted squared error of the x0 prediction, a float32 scalar.

    Squared errors are averaged over the latent dimension (the paper's ||.||^2 is d times this,
    a constant factor), then over the unmasked (example, latent) entries; an all-masked batch
    gives 0.
    """
    chex.assert_equal_shape([y0_pred, y0])
    chex.assert_rank(y0, 3)
    b, n = y0.shape[:2]
    err = jnp.mean(jnp.square(y0_pred.astype(jnp.float32) - y0.astype(jnp.float32)), axis=-1)
    weighted = loss_weights(schedule, t, weighting, gamma)[:, None] * err  # [batch, L]
    keep = jnp.ones((b, n)) if mask is None else jnp.broadcast_to(mask.reshape(b, -1), (b, n))
    keep = keep.astype(jnp.float32)
    return jnp.sum(weighted * keep) / jnp.maximum(jnp.sum(keep), 1.0)


@struct.dataclass
class LatentStats:
    """Per-dimension mean and a scale (shared [] or per dimension [d]) of training latents."""

    mean: jax.Array  # [d] float32
    scale: jax.Array  # [] or [d] float32


def fit_latent_stats(
    latents: np.ndarray | jax.Array,  # [..., d]
    per_dim_scale: bool = False,
    eps: float = 1e-6,
    chunk_rows: int = 65536,
) -> LatentStats:
    """Mean and standard deviation of latents, accumulated in float64 over row chunks so a
    memory-mapped array of any size is read once per pass without a full copy.

    The shared scale is the root mean square of the centred values over all dimensions, so
    standardised latents have unit average variance per dimension while keeping the relative
    scale of dimensions; `per_dim_scale` whitens each dimension separately. Scales are floored
    at `eps`, so a constant dimension does not divide by zero.
    """
    flat = latents.reshape(-1, latents.shape[-1])
    n, d = flat.shape
    if n == 0:
        raise ValueError("fit_latent_stats needs at least one latent")

    def chunks():
        for start in range(0, n, chunk_rows):
            yield np.asarray(flat[start : start + chunk_rows], np.float64)

    mean = sum(c.sum(axis=0) for c in chunks()) / n
    var = sum(np.square(c - mean).sum(axis=0) for c in chunks()) / n
    scale = np.sqrt(var if per_dim_scale else var.mean())
    return LatentStats(
        mean=jnp.asarray(mean, jnp.float32),
        scale=jnp.asarray(np.maximum(scale, eps), jnp.float32),
    )


def standardise(stats: LatentStats, y: jax.Array) -> jax.Array:
    """Raw latents [..., d] -> the space diffusion runs in."""
    return (y - stats.mean) / stats.scale


def unstandardise(stats: LatentStats, y: jax.Array) -> jax.Array:
    """Back from diffusion space to the encoder's space, before the LLM reads it."""
    return y * stats.scale + stats.mean
