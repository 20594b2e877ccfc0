"""Per-style denoisers with stacked parameters: routing, isolation, timestep features, what
the output depends on, and the paper's one-attention denoiser against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy_reference import (
    attention_weights,
    gelu,
    layer_norm,
    multi_head_attention,
    randomise_parameters,
    weights,
)

from lisendiff_jax.method.denoiser import (
    Denoiser,
    DenoiserConfig,
    StyleDenoisers,
    timestep_embedding,
)

D = 16
CONFIG = DenoiserConfig(d_enc=D, num_heads=4, time_dim=8)
keys = jax.random.split(jax.random.key(0), 2)
Y_T = jax.random.normal(keys[0], (4, 1, D))
X = jax.random.normal(keys[1], (4, 3, D))
T = jnp.array([0, 7, 49, 20])
STYLES = jnp.array([1, 0, 1, 0])
# Compiled once per shape: op-by-op execution of vmapped modules is slow on the CPU.
run = nnx.jit(lambda module, *args: module(*args))


@pytest.fixture(scope="module")
def denoisers():
    return StyleDenoisers(2, CONFIG, rngs=nnx.Rngs(0))


def test_parameters_are_stacked_over_styles(denoisers):
    q = denoisers.stacked.blocks[0].attn.q_proj.kernel
    assert q.shape == (2, D, D)
    assert not np.allclose(q[...][0], q[...][1])  # styles start from different weights


def test_mixed_batch_routes_each_example_to_its_style(denoisers):
    out = np.asarray(run(denoisers, Y_T, T, X, STYLES))
    assert out.shape == (4, 1, D)
    for style in (0, 1):
        rows = np.flatnonzero(np.asarray(STYLES) == style)
        alone = run(denoisers.for_style(style), Y_T[rows], T[rows], X[rows])
        np.testing.assert_allclose(out[rows], alone, rtol=1e-5, atol=1e-6)


def test_other_styles_parameters_do_not_matter(denoisers):
    before = np.asarray(run(denoisers, Y_T, T, X, STYLES))
    changed = nnx.clone(denoisers)
    nnx.update(changed, jax.tree.map(lambda p: p.at[1].add(0.3), nnx.state(changed, nnx.Param)))
    after = np.asarray(run(changed, Y_T, T, X, STYLES))
    style0 = np.asarray(STYLES) == 0
    np.testing.assert_array_equal(after[style0], before[style0])
    assert not np.allclose(after[~style0], before[~style0], atol=1e-3)


def test_gradients_reach_only_the_styles_in_the_batch(denoisers):
    def loss(model):
        return jnp.sum(model(Y_T, T, X, jnp.zeros(4, jnp.int32)) ** 2)

    grads = jax.tree.leaves(nnx.jit(nnx.grad(loss))(denoisers))
    assert all(not np.any(g[1]) for g in grads)
    assert any(np.any(g[0]) for g in grads)


def test_output_depends_on_the_context_summary_and_the_step(denoisers):
    out = np.asarray(run(denoisers, Y_T, T, X, STYLES))
    other_x = np.asarray(run(denoisers, Y_T, T, X[::-1], STYLES))
    other_t = np.asarray(run(denoisers, Y_T, (T + 13) % 50, X, STYLES))
    # Every example's prediction moves, by far more than float noise.
    for changed in (other_x, other_t):
        assert np.all(np.abs(changed - out).max(axis=(1, 2)) > 1e-2)


def test_one_attention_denoiser_equals_numpy():
    """depth 1, no MLP: y0_hat = out(LN(y_t + Attn(LN(y_t), LN([t_emb; x])))), with
    t_emb = MLP(sinusoid(t)), every weight random."""
    config = DenoiserConfig(d_enc=D, num_heads=4, depth=1, mlp_ratio=0, time_dim=8, eps=1e-5)
    module = Denoiser(config, rngs=nnx.Rngs(1))
    assert module.blocks[0].mlp is None
    randomise_parameters(module, seed=2)
    out = np.asarray(run(module, Y_T, T, X))

    w = weights(module)
    half = config.time_dim // 2
    angles = np.asarray(T, np.float64)[:, None] * 10000.0 ** (-np.arange(half) / half)
    sinusoid = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)  # [batch, time_dim]
    hidden = gelu(sinusoid @ w["time_mlp.fc_in.kernel"] + w["time_mlp.fc_in.bias"])
    t_emb = hidden @ w["time_mlp.fc_out.kernel"] + w["time_mlp.fc_out.bias"]  # [batch, D]
    keys_values = np.concatenate([t_emb[:, None], np.asarray(X, np.float64)], axis=1)
    y_t = np.asarray(Y_T, np.float64)

    def norm(x, name):
        return layer_norm(x, w[f"{name}.scale"], w[f"{name}.bias"], config.eps)

    h = y_t + multi_head_attention(
        norm(y_t, "blocks.0.query_norm"),
        norm(keys_values, "blocks.0.kv_norm"),
        None,
        attention_weights(w, "blocks.0.attn"),
        config.num_heads,
    )
    reference = norm(h, "out_norm") @ w["out_proj.kernel"] + w["out_proj.bias"]
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_timestep_embedding():
    emb = np.asarray(timestep_embedding(jnp.array([0, 3]), 7))
    assert emb.shape == (2, 7)
    np.testing.assert_array_equal(emb[0], [0, 0, 0, 1, 1, 1, 0])  # sin 0, cos 0, padding
    np.testing.assert_allclose(emb[1, 0], np.sin(3.0), rtol=1e-6)
    assert np.all(np.abs(emb) <= 1)
