"""DDPM and DDIM sampling chains for the x0-parameterised denoiser, as pure functions.

Every step of both samplers has one form,

    y0_hat = f(y_t, t)
    y_prev = coef_y0 * y0_hat + coef_yt * y_t + sigma * z,    z ~ N(0, I),

so a sampler is a `Plan`: the steps it visits (0-based, descending) and three coefficients per
step. `run_chain` runs any plan as one `lax.scan`, so the whole chain compiles into one loop.

- DDPM (Ho et al., 2020) visits all T steps and draws from the posterior
  q(y_{t-1} | y_t, y0 = y0_hat): its mean coefficients and the square root of its variance.
- DDIM (Song et al., 2021) visits S <= T evenly spaced steps. With eta = 1 and S = T it is
  exactly DDPM (same coefficients, see the tests); eta = 0 makes every step deterministic, so
  the sample depends on the starting noise only.

Two knobs steer a chain through its predictions, never its coefficients (`steered`):
- the empathy dial w mixes the default-style and the empathy-style prediction of each step,
  y0 = y0_default + w (y0_empathy - y0_default): w = 0 is the default style, w = 1 the empathy
  style, w > 1 pushes past it;
- classifier-free guidance g on the context (Ho & Salimans, 2022) mixes each style's
  prediction from the context summary x with its prediction from a learned null summary,
  y0 = y0(null) + g (y0(x) - y0(null)); g = 1 is no guidance.
Both are `lerp`s, exact at w (or g) = 0 and 1: at those ends the mixed prediction is the
plain style's (or the unguided one) bit for bit, from the batched call that computes both.

The last step of every plan maps to alpha_bar = 1 (coef_y0 = 1, coef_yt = sigma = 0), so the
chain's result is the denoiser's final prediction. Chains run in the standardised space the
denoiser was trained in; `sample` draws the noise, runs the chain and returns latents in the
encoder's space, which is what the LLM's cross-attention reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lisendiff_jax.method.diffusion import LatentStats, Schedule, unstandardise

# (y_t [batch, L, d], t [batch] int32) -> predicted y0 [batch, L, d]
DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
# (y_t [batch, L, d], t [batch] int32) -> predicted y0 of each branch [branches, batch, L, d]
BranchesFn = Callable[[jax.Array, jax.Array], jax.Array]
SamplerName = Literal["ddpm", "ddim"]


@struct.dataclass
class Plan:
    """The steps a sampler visits, in the order it visits them, and their coefficients."""

    timesteps: jax.Array  # [S] int32, descending, ends at 0
    coef_y0: jax.Array  # [S] float32
    coef_yt: jax.Array  # [S] float32
    sigma: jax.Array  # [S] float32, 0 at the last step

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def ddpm_plan(schedule: Schedule) -> Plan:
    """Ancestral sampling through all T steps with the posterior's mean and variance."""
    t = jnp.arange(schedule.num_steps - 1, -1, -1, dtype=jnp.int32)
    return Plan(
        timesteps=t,
        coef_y0=schedule.posterior_mean_coef_y0[t],
        coef_yt=schedule.posterior_mean_coef_yt[t],
        sigma=jnp.sqrt(schedule.posterior_variance[t]),
    )


def ddim_timesteps(total: int, num_steps: int) -> np.ndarray:
    """`num_steps` evenly spaced 0-based steps [S] from total - 1 down to 0, both included."""
    if not 2 <= num_steps <= total:
        raise ValueError(f"DDIM steps must be in [2, {total}] for this schedule, got {num_steps}")
    # Spacing (total - 1) / (num_steps - 1) >= 1, so rounding keeps the steps distinct.
    return np.round(np.linspace(total - 1, 0, num_steps)).astype(np.int32)


def ddim_plan(schedule: Schedule, num_steps: int, eta: float = 0.0) -> Plan:
    """DDIM through `num_steps` of the schedule's steps; `eta` scales the noise (0: none,
    1: the posterior's). Built from a concrete schedule, in float64, outside jit."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    t = ddim_timesteps(schedule.num_steps, num_steps)
    # From the betas rather than the stored float32 alpha_bars: near t = 0, 1 - alpha_bar is
    # ~1e-3 and float32 alpha_bars would put 1e-5 relative errors into the coefficients.
    alpha_bars = np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))
    abar = alpha_bars[t]
    abar_prev = np.concatenate([alpha_bars[t[1:]], [1.0]])  # after the last step: clean
    sigma = eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    # y_prev = sqrt(abar_prev) y0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z, with
    # eps_hat = (y_t - sqrt(abar) y0_hat) / sqrt(1 - abar), regrouped by y0_hat and y_t.
    coef_yt = np.sqrt(np.maximum(1.0 - abar_prev - sigma**2, 0.0) / (1.0 - abar))
    coef_y0 = np.sqrt(abar_prev) - coef_yt * np.sqrt(abar)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return Plan(jnp.asarray(t), f32(coef_y0), f32(coef_yt), f32(sigma))


def make_plan(
    schedule: Schedule, sampler: SamplerName = "ddpm", num_steps: int = 0, eta: float = 0.0
) -> Plan:
    """The plan for a sampler by name; `num_steps` and `eta` apply to DDIM (0 steps = T)."""
    if sampler == "ddpm":
        return ddpm_plan(schedule)
    if sampler == "ddim":
        return ddim_plan(schedule, num_steps or schedule.num_steps, eta)
    raise ValueError(f"unknown sampler {sampler!r}; choose ddpm or ddim")


def lerp(a: jax.Array, b: jax.Array, w: jax.Array) -> jax.Array:
    """a + w (b - a) for a, b [..., batch, L, d] and one w per row [batch], written as
    (1 - w) a + w b: that form is a (bit for bit) at w = 0 and b at w = 1, where
    a + w (b - a) can round away from b (a = 1, b = 1e-8: 1 + (1e-8 - 1) is 0 in float32)."""
    chex.assert_equal_shape([a, b])
    w = w.astype(a.dtype)[:, None, None]  # [batch, 1, 1]
    return (1 - w) * a + w * b


def steered(
    branches: BranchesFn,
    empathy: jax.Array,  # [batch] float: the dial w of each row
    guidance: jax.Array | None = None,  # [batch] float: the guidance scale g; None: no null
) -> DenoiseFn:
    """The denoise function of a dialled, optionally guided chain. `branches` gives, in one
    call, the default-style and the empathy-style prediction [2, batch, L, d] (each from its
    own style summary), or with `guidance` [4, batch, L, d]: those two from the context
    summary, then the same two from the null summary."""

    def denoise(y_t: jax.Array, t: jax.Array) -> jax.Array:
        y0 = branches(y_t, t)
        chex.assert_shape(y0, (2 if guidance is None else 4, *y_t.shape))
        if guidance is not None:
            y0 = lerp(y0[2:], y0[:2], guidance)  # [2, batch, L, d]: null -> context
        return lerp(y0[0], y0[1], empathy)

    return denoise


def denoise_step(
    denoise: DenoiseFn,
    y_t: jax.Array,  # [batch, L, d]
    t: jax.Array,  # [] int32
    coef_y0: jax.Array,  # []
    coef_yt: jax.Array,  # []
    sigma: jax.Array,  # []
    z: jax.Array,  # [batch, L, d]
) -> tuple[jax.Array, jax.Array]:
    """One step of any plan: (y_prev, y0_hat), both [batch, L, d]."""
    y0_hat = denoise(y_t, jnp.full((y_t.shape[0],), t, jnp.int32))
    chex.assert_equal_shape([y0_hat, y_t])
    return coef_y0 * y0_hat + coef_yt * y_t + sigma * z, y0_hat


def run_chain(
    denoise: DenoiseFn,
    plan: Plan,
    y_start: jax.Array,  # [batch, L, d], noise at the plan's first step
    noise: jax.Array,  # [S, batch, L, d], z of each step (the last step's is unused)
    return_trajectory: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """The chain as one `lax.scan`: the sample [batch, L, d] and, if asked, the predicted y0
    at every step [S, batch, L, d] in the order the steps ran (the last entry is t = 0)."""
    chex.assert_rank(y_start, 3)
    chex.assert_shape(noise, (plan.num_steps, *y_start.shape))

    def step(y_t, inputs):
        y_prev, y0_hat = denoise_step(denoise, y_t, *inputs)
        return y_prev, y0_hat if return_trajectory else None

    inputs = (plan.timesteps, plan.coef_y0, plan.coef_yt, plan.sigma, noise)
    sample, trajectory = jax.lax.scan(step, y_start, inputs)
    return sample, trajectory


def draw_noise(rng: jax.Array, plan: Plan, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The starting noise `shape` and the per-step noise [S, *shape] of one chain."""
    start_key, steps_key = jax.random.split(rng)
    return (
        jax.random.normal(start_key, shape),
        jax.random.normal(steps_key, (plan.num_steps, *shape)),
    )


def sample(
    denoise: DenoiseFn,
    plan: Plan,
    stats: LatentStats,
    keys: jax.Array,  # [batch] PRNG keys: row i's noise comes from keys[i] alone
    shape: tuple[int, int],  # (L, d) of one row
    return_trajectory: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Latents [batch, L, d] in the encoder's space, and optionally the predicted y0 of every
    step [S, batch, L, d] (also unstandardised), from a chain run in standardised space.

    Each row draws its noise from its own key, so a row's sample does not depend on the
    other rows of the batch, nor on how the batch is split over devices."""
    y_start, noise = jax.vmap(lambda key: draw_noise(key, plan, shape))(keys)
    # noise: [batch, S, L, d] -> the chain's [S, batch, L, d]
    latents, trajectory = run_chain(
        denoise, plan, y_start, jnp.swapaxes(noise, 0, 1), return_trajectory
    )
    if trajectory is not None:
        trajectory = unstandardise(stats, trajectory)
    return unstandardise(stats, latents), trajectory
