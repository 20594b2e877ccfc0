"""Schedules, forward noising, posterior coefficients, the x0 loss and latent statistics."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lisendiff_jax.method.diffusion import (
    fit_latent_stats,
    loss_weights,
    make_schedule,
    q_posterior,
    q_sample,
    standardise,
    unstandardise,
    x0_loss,
)

# prod(1 - linspace(0.001, 0.02, 50)), computed in float64.
PAPER_ALPHA_BAR_T = 0.5894442108552517


def test_paper_schedule_is_the_default():
    s = make_schedule()
    assert s.num_steps == 50 and s.name == "linear"
    np.testing.assert_allclose(np.asarray(s.betas)[[0, -1]], [0.001, 0.02], rtol=1e-6)
    np.testing.assert_allclose(float(s.alpha_bar_T), PAPER_ALPHA_BAR_T, rtol=1e-6)
    np.testing.assert_allclose(s.alpha_bars, np.cumprod(1 - np.linspace(0.001, 0.02, 50)), 1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine", "zero_terminal_snr"])
def test_schedules_are_valid(name):
    s = make_schedule(name)
    betas, abar = np.asarray(s.betas), np.asarray(s.alpha_bars)
    assert np.all((betas > 0) & (betas <= 1))
    assert np.all(np.diff(abar) < 0)
    np.testing.assert_allclose(s.alpha_bars_prev[1:], abar[:-1], rtol=1e-6)


def test_zero_terminal_snr_ends_at_zero():
    s = make_schedule("zero_terminal_snr")
    assert float(s.alpha_bar_T) == 0.0
    assert float(s.snr[-1]) == 0.0
    # The rescaling keeps the first step of the schedule it starts from.
    np.testing.assert_allclose(s.alpha_bars[0], make_schedule().alpha_bars[0], rtol=1e-6)
    assert np.all(np.isfinite(s.posterior_mean_coef_y0)) and np.all(np.isfinite(s.snr))


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'sigmoid'.*linear, cosine, zero_terminal_snr"):
        make_schedule("sigmoid")


def test_q_sample_matches_closed_form():
    s = make_schedule()
    rng = np.random.RandomState(0)
    y0, noise = rng.randn(4, 2, 8), rng.randn(4, 2, 8)
    t = np.array([0, 10, 25, 49])
    abar = np.cumprod(1 - np.linspace(0.001, 0.02, 50))[t][:, None, None]
    expected = np.sqrt(abar) * y0 + np.sqrt(1 - abar) * noise
    out = q_sample(s, jnp.asarray(y0, jnp.float32), jnp.asarray(t), jnp.asarray(noise, jnp.float32))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "zero_terminal_snr"])
def test_posterior_matches_product_of_gaussians(name):
    s = make_schedule(name)
    y0, y_t = np.full((49, 3), 0.7), np.full((49, 3), -1.3)
    t = np.arange(1, 50)
    beta = np.asarray(s.betas, np.float64)[t]
    abar_prev = np.asarray(s.alpha_bars, np.float64)[t - 1]
    # q(y_{t-1} | y_t, y0) is proportional to N(y_t; sqrt(alpha) y_{t-1}, beta) times
    # N(y_{t-1}; sqrt(abar_prev) y0, 1 - abar_prev).
    precision = (1 - beta) / beta + 1 / (1 - abar_prev)
    mean = np.sqrt(1 - beta) * y_t[:, 0] / beta + np.sqrt(abar_prev) * y0[:, 0] / (1 - abar_prev)
    mean = mean / precision
    got_mean, got_var = q_posterior(s, jnp.asarray(y0), jnp.asarray(y_t), jnp.asarray(t))
    np.testing.assert_allclose(got_var, 1 / precision, rtol=1e-4)
    np.testing.assert_allclose(got_mean[:, 0], mean, rtol=1e-4, atol=1e-6)
    # At the first step the posterior is the clean latent itself.
    mean0, var0 = q_posterior(s, jnp.asarray(y0[:1]), jnp.asarray(y_t[:1]), jnp.zeros(1, int))
    np.testing.assert_allclose(mean0, y0[:1], rtol=1e-6)
    assert float(var0[0]) == 0.0 and np.all(np.isfinite(s.posterior_log_variance_clipped))


def test_loss_weights():
    s = make_schedule()
    t = jnp.array([0, 20, 49])
    abar = np.cumprod(1 - np.linspace(0.001, 0.02, 50))[[0, 20, 49]]
    snr = abar / (1 - abar)
    np.testing.assert_array_equal(loss_weights(s, t, "uniform"), [1, 1, 1])
    np.testing.assert_allclose(loss_weights(s, t, "snr"), snr, rtol=1e-4)
    np.testing.assert_allclose(loss_weights(s, t, "min_snr", gamma=5.0), np.minimum(snr, 5), 1e-4)
    with pytest.raises(ValueError, match="'p2'"):
        loss_weights(s, t, "p2")


def test_x0_loss_weights_and_mask():
    s = make_schedule()
    rng = np.random.RandomState(1)
    y0 = rng.randn(3, 2, 4).astype(np.float32)
    pred = y0 + rng.randn(3, 2, 4).astype(np.float32)
    pred[2] += 1e6  # a padding row: must not count
    t = jnp.array([0, 30, 49])
    mask = jnp.array([True, True, False])
    err = np.mean((pred - y0) ** 2, axis=-1)  # [3, 2]
    w = np.asarray(loss_weights(s, t, "min_snr"))
    expected = np.sum(w[:2, None] * err[:2]) / 4
    got = x0_loss(s, jnp.asarray(pred), jnp.asarray(y0), t, weighting="min_snr", mask=mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # A per-latent mask counts entries; no mask averages everything.
    latent_mask = jnp.array([[True, False], [True, True], [False, False]])
    got = x0_loss(s, jnp.asarray(pred), jnp.asarray(y0), t, mask=latent_mask)
    np.testing.assert_allclose(got, (err[0, 0] + err[1].sum()) / 3, rtol=1e-5)
    got = x0_loss(s, jnp.asarray(pred[:2]), jnp.asarray(y0[:2]), t[:2])
    np.testing.assert_allclose(got, err[:2].mean(), rtol=1e-5)
    none = jnp.zeros(3, bool)
    assert float(x0_loss(s, jnp.asarray(pred), jnp.asarray(y0), t, mask=none)) == 0.0


@pytest.mark.parametrize("per_dim", [False, True])
def test_latent_stats_round_trip(per_dim):
    rng = np.random.RandomState(2)
    latents = (rng.randn(1000, 6) * [1, 2, 3, 4, 5, 0] + np.arange(6) * 10).astype(np.float32)
    stats = fit_latent_stats(latents, per_dim_scale=per_dim, chunk_rows=64)
    assert stats.mean.shape == (6,) and stats.scale.shape == ((6,) if per_dim else ())
    np.testing.assert_allclose(stats.mean, latents.mean(0), rtol=1e-5, atol=1e-5)
    z = np.asarray(standardise(stats, jnp.asarray(latents)))
    assert np.all(np.isfinite(z))  # the constant last dimension is floored, not divided by 0
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-3)
    if per_dim:
        np.testing.assert_allclose(z[:, :5].std(0), 1, rtol=1e-3)
    else:
        np.testing.assert_allclose(np.mean(z.var(0)), 1, rtol=1e-3)
    np.testing.assert_allclose(unstandardise(stats, jnp.asarray(z)), latents, rtol=1e-5, atol=1e-4)
    # Chunking changes nothing; latent sets [n, L, d] are pooled over n and L.
    whole = fit_latent_stats(latents.reshape(500, 2, 6), per_dim_scale=per_dim)
    np.testing.assert_allclose(whole.scale, stats.scale, rtol=1e-6)
