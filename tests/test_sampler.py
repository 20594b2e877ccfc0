"""The DDPM / DDIM chains: against a NumPy reference, against each other, and their trace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lisendiff_jax.method.denoiser import DenoiserConfig, StyleDenoisers
from lisendiff_jax.method.diffusion import LatentStats, make_schedule
from lisendiff_jax.method.sampler import (
    ddim_plan,
    ddpm_plan,
    denoise_step,
    make_plan,
    run_chain,
    sample,
)

T, SHAPE = 50, (3, 2, 4)  # batch 3, a latent set of 2 vectors of 4 dimensions
W = np.random.RandomState(0).randn(4, 4) * 0.7


def toy_denoiser(xp):
    """The same smooth function of (y_t, t) in NumPy (xp=np) and JAX (xp=jnp)."""

    def f(y_t, t):
        gain = 1.0 + xp.asarray(t, y_t.dtype)[:, None, None] / T
        return xp.tanh(y_t @ xp.asarray(W, y_t.dtype)) * gain + 0.1

    return f


def reference_ddpm(f, betas, y, noise):
    """Ancestral sampling written from the DDPM formulas, step by step, in float64."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    for i, t in enumerate(range(len(betas) - 1, -1, -1)):
        abar_prev = abar[t - 1] if t > 0 else 1.0
        y0_hat = np.asarray(f(y, np.full(y.shape[0], t)), np.float64)
        mean = (
            np.sqrt(abar_prev) * betas[t] / (1 - abar[t]) * y0_hat
            + np.sqrt(alphas[t]) * (1 - abar_prev) / (1 - abar[t]) * y
        )
        variance = betas[t] * (1 - abar_prev) / (1 - abar[t])
        y = mean + np.sqrt(variance) * noise[i]
    return y


def draw(seed=0, steps=T):
    rng = np.random.RandomState(seed)
    return rng.randn(*SHAPE), rng.randn(steps, *SHAPE)


def chain(plan, y, noise, denoise=None, trajectory=False):
    fn = jax.jit(lambda y, n: run_chain(denoise or toy_denoiser(jnp), plan, y, n, trajectory))
    return fn(jnp.asarray(y, jnp.float32), jnp.asarray(noise, jnp.float32))


def test_scan_ddpm_equals_a_numpy_reference_on_the_same_noise():
    schedule = make_schedule("linear", T)
    y, noise = draw()
    ours, _ = chain(ddpm_plan(schedule), y, noise)
    expected = reference_ddpm(toy_denoiser(np), np.linspace(0.001, 0.02, T), y, noise)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-4, atol=1e-5)


def test_scan_ddpm_with_the_style_denoiser_equals_step_by_step_calls():
    schedule = make_schedule("linear", T)
    denoisers = StyleDenoisers(2, DenoiserConfig(d_enc=4, num_heads=2), rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.RandomState(1).randn(3, 1, 4), jnp.float32)
    style = jnp.array([0, 1, 1])
    graphdef, state = nnx.split(denoisers)

    def denoise(y_t, t):
        return nnx.merge(graphdef, state)(y_t, t, x, style)

    y, noise = draw(2)
    ours, _ = chain(ddpm_plan(schedule), y, noise, denoise)
    expected = reference_ddpm(jax.jit(denoise), np.linspace(0.001, 0.02, T), y, noise)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["linear", "cosine", "zero_terminal_snr"])
def test_ddim_with_every_step_and_eta_1_is_ddpm(name):
    schedule = make_schedule(name, T)
    ddpm, ddim = ddpm_plan(schedule), ddim_plan(schedule, T, eta=1.0)
    np.testing.assert_array_equal(ddim.timesteps, ddpm.timesteps)
    for field in ("coef_y0", "coef_yt", "sigma"):
        np.testing.assert_allclose(getattr(ddim, field), getattr(ddpm, field), atol=2e-6)
    y, noise = draw(3)
    np.testing.assert_allclose(chain(ddim, y, noise)[0], chain(ddpm, y, noise)[0], atol=1e-5)


def test_every_plan_ends_on_the_clean_prediction():
    schedule = make_schedule("linear", T)
    for plan in (ddpm_plan(schedule), ddim_plan(schedule, 10, 0.0), ddim_plan(schedule, 7, 1.0)):
        assert int(plan.timesteps[0]) == T - 1 and int(plan.timesteps[-1]) == 0
        assert np.all(np.diff(np.asarray(plan.timesteps)) < 0)
        last = (float(plan.coef_y0[-1]), float(plan.coef_yt[-1]), float(plan.sigma[-1]))
        np.testing.assert_allclose(last, (1.0, 0.0, 0.0), atol=1e-6)


def test_ddim_eta_0_depends_on_the_starting_noise_only():
    plan = ddim_plan(make_schedule("linear", T), 10, eta=0.0)
    y, noise_a = draw(4, steps=10)
    _, noise_b = draw(5, steps=10)
    a, _ = chain(plan, y, noise_a)
    b, _ = chain(plan, y, noise_b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    stochastic = ddim_plan(make_schedule("linear", T), 10, eta=1.0)
    assert not np.allclose(chain(stochastic, y, noise_a)[0], chain(stochastic, y, noise_b)[0])


@pytest.mark.parametrize("sampler,steps,expected", [("ddpm", 0, T), ("ddim", 10, 10)])
def test_trajectory_has_one_prediction_per_step(sampler, steps, expected):
    plan = make_plan(make_schedule("linear", T), sampler, steps)
    y, noise = draw(6, steps=plan.num_steps)
    final, trajectory = chain(plan, y, noise, trajectory=True)
    assert trajectory.shape == (expected, *SHAPE)
    np.testing.assert_allclose(trajectory[-1], final, atol=1e-6)
    # Entry i is the prediction made at plan.timesteps[i].
    i = 3
    y_i, _ = chain(plan.replace(**{k: v[:i] for k, v in vars(plan).items()}), y, noise[:i])
    t_i = jnp.full((SHAPE[0],), plan.timesteps[i])
    np.testing.assert_allclose(trajectory[i], toy_denoiser(jnp)(y_i, t_i), atol=1e-5)


def test_sample_returns_latents_in_the_encoders_space():
    plan = ddim_plan(make_schedule("linear", T), 5)
    stats = LatentStats(mean=jnp.array([1.0, -2.0, 0.0, 3.0]), scale=jnp.asarray(2.5))
    constant = jnp.array([0.5, 0.0, -1.0, 2.0])
    latents, trajectory = sample(
        lambda y, t: jnp.broadcast_to(constant, y.shape),
        plan,
        stats,
        jax.random.split(jax.random.key(0), SHAPE[0]),
        SHAPE[1:],
        True,
    )
    np.testing.assert_allclose(latents, jnp.broadcast_to(constant * 2.5 + stats.mean, SHAPE))
    np.testing.assert_allclose(trajectory[0], latents)


def test_each_row_draws_from_its_own_key():
    plan = ddpm_plan(make_schedule("linear", T))
    stats = LatentStats(mean=jnp.zeros(SHAPE[-1]), scale=jnp.asarray(1.0))
    keys = jax.random.split(jax.random.key(1), SHAPE[0])
    whole, _ = sample(toy_denoiser(jnp), plan, stats, keys, SHAPE[1:])
    alone, _ = sample(toy_denoiser(jnp), plan, stats, keys[2:3], SHAPE[1:])
    np.testing.assert_allclose(alone[0], whole[2], atol=1e-6)
    assert not np.allclose(whole[0], whole[1])


def test_scan_equals_a_python_loop_of_jitted_steps():
    plan = ddpm_plan(make_schedule("linear", T))
    y, noise = draw(7)
    step = jax.jit(lambda *a: denoise_step(toy_denoiser(jnp), *a))
    loop = jnp.asarray(y, jnp.float32)
    for i in range(plan.num_steps):
        coefs = (plan.timesteps[i], plan.coef_y0[i], plan.coef_yt[i], plan.sigma[i])
        loop, _ = step(loop, *coefs, jnp.asarray(noise[i], jnp.float32))
    np.testing.assert_allclose(chain(plan, y, noise)[0], loop, atol=1e-6)


def test_bad_sampler_settings_are_named():
    schedule = make_schedule("linear", T)
    with pytest.raises(ValueError, match=r"DDIM steps must be in \[2, 50\]"):
        ddim_plan(schedule, 51)
    with pytest.raises(ValueError, match="eta must be in"):
        ddim_plan(schedule, 10, eta=1.5)
    with pytest.raises(ValueError, match="unknown sampler 'ddpx'"):
        make_plan(schedule, "ddpx")
