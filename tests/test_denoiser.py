"""Per-style denoisers with stacked parameters: routing, isolation, timestep features."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lisendiff_jax.method.denoiser import DenoiserConfig, StyleDenoisers, timestep_embedding

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


def test_timestep_embedding():
    emb = np.asarray(timestep_embedding(jnp.array([0, 3]), 7))
    assert emb.shape == (2, 7)
    np.testing.assert_array_equal(emb[0], [0, 0, 0, 1, 1, 1, 0])  # sin 0, cos 0, padding
    np.testing.assert_allclose(emb[1, 0], np.sin(3.0), rtol=1e-6)
    assert np.all(np.abs(emb) <= 1)
