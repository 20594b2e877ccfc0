"""The style-aware context summary: per-example styles, padding, empty contexts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lisendiff_jax.method.summary import StyleSummary

D = 16
CONTEXT = jax.random.normal(jax.random.key(0), (4, 5, D))
# Row 3 has no context at all.
MASK = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], bool)
STYLES = jnp.array([0, 1, 1, 0])
# Compiled once per shape: faster than op-by-op execution on the CPU.
run = nnx.jit(lambda module, *args: module(*args))


@pytest.fixture(scope="module")
def summary():
    return StyleSummary(2, 3, D, num_heads=4, rngs=nnx.Rngs(0))


def test_mixed_styles_each_use_their_own_queries(summary):
    context = CONTEXT.at[1].set(CONTEXT[0])  # rows 0 and 1: same context, different styles
    out = np.asarray(run(summary, context, MASK, STYLES))
    assert out.shape == (4, 3, D) and np.all(np.isfinite(out))
    assert not np.allclose(out[0], out[1], atol=1e-3)
    for i in range(4):
        alone = run(summary, context[i : i + 1], MASK[i : i + 1], STYLES[i : i + 1])
        np.testing.assert_allclose(alone[0], out[i], rtol=1e-5, atol=1e-5)


def test_padding_and_order_of_utterances_are_ignored(summary):
    out = np.asarray(run(summary, CONTEXT, MASK, STYLES))
    padded_changed = CONTEXT.at[0, 3:].set(50.0)
    np.testing.assert_allclose(run(summary, padded_changed, MASK, STYLES)[0], out[0], atol=1e-6)
    reordered = CONTEXT.at[0, :3].set(CONTEXT[0, ::-1][2:])
    np.testing.assert_allclose(run(summary, reordered, MASK, STYLES)[0], out[0], atol=1e-5)


def test_empty_context_gives_the_styles_context_free_summary(summary):
    out = np.asarray(run(summary, CONTEXT, MASK, STYLES))
    assert np.all(np.isfinite(out[3]))
    # Attention contributes nothing, so the queries only pass through the residual MLP.
    block = summary.blocks[0]
    q = summary.queries[...][0]
    expected = q + block.mlp(block.mlp_norm(q))
    np.testing.assert_allclose(out[3], expected, rtol=1e-5, atol=1e-6)


def test_depth_and_parameters():
    deep = StyleSummary(2, 3, D, num_heads=2, depth=2, mlp_ratio=2, rngs=nnx.Rngs(1))
    assert deep.queries.shape == (2, 3, D) and len(deep.blocks) == 2
    assert run(deep, CONTEXT, None, STYLES).shape == (4, 3, D)
