"""Cross-attention to the latent set: exact start, masking, L = 1 (the value path only), NumPy
parity, cached decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy_reference import (
    attention_weights,
    layer_norm,
    multi_head_attention,
    randomise_parameters,
    rms_norm,
    weights,
)
from tiny_checkpoints import make_checkpoint

from lisendiff_jax.backbone import load_backbone
from lisendiff_jax.method.cross_attention import CrossAttention, attach_cross_attention

LATENT_DIM = 32
IDS = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 10)), jnp.int32)
LATENTS = jax.random.normal(jax.random.key(0), (2, 3, LATENT_DIM))
LATENT_MASK = jnp.array([[True, True, False], [True, False, False]])
L = LATENTS.shape[1]  # the modules below are built for it, unless a test says otherwise


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_bias")
    make_checkpoint("qwen2_bias", folder)
    return folder


def randomise_outputs(module: nnx.Module, seed: int = 0) -> None:
    """Gives every zero-initialised output projection random weights."""
    rng = np.random.RandomState(seed)
    for path, var in nnx.to_flat_state(nnx.state(module)):
        if path[-2:] == ("o_proj", "kernel") and "attn" in path[:-2]:
            var.set_value(jnp.asarray(0.2 * rng.randn(*var.shape), var.dtype))


def test_step_zero_equals_backbone_exactly(folder):
    model = load_backbone(folder)
    reference = np.asarray(model(IDS))
    attach_cross_attention(model, last_n=2, latent_dim=LATENT_DIM, num_latents=L, rngs=nnx.Rngs(0))
    assert model.layers[0].cross_attn is None
    assert all(isinstance(model.layers[i].cross_attn, CrossAttention) for i in (1, 2))
    out = np.asarray(model(IDS, latents=LATENTS, latent_mask=LATENT_MASK))
    np.testing.assert_array_equal(out, reference)


def test_zero_start_in_a_bfloat16_backbone():
    module = CrossAttention(64, LATENT_DIM, num_latents=L, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    params = nnx.to_flat_state(nnx.state(module))
    assert all(var.dtype == jnp.float32 for _, var in params)
    out = module(jnp.ones((2, 5, 64), jnp.bfloat16), LATENTS, LATENT_MASK)
    assert out.dtype == jnp.bfloat16 and not np.any(np.asarray(out, np.float32))


def test_latents_matter_and_padding_is_ignored(folder):
    model = attach_cross_attention(
        load_backbone(folder), 2, LATENT_DIM, inner_dim=32, num_latents=L, rngs=nnx.Rngs(0)
    )
    assert model.layers[2].cross_attn.attn.num_heads == 2  # inner 32 / head_dim 16
    randomise_outputs(model)
    base = np.asarray(model(IDS))
    out = np.asarray(model(IDS, latents=LATENTS, latent_mask=LATENT_MASK))
    assert not np.allclose(out, base, atol=1e-3)

    padded_changed = LATENTS.at[0, 2].set(100.0).at[1, 1:].set(-7.0)
    again = np.asarray(model(IDS, latents=padded_changed, latent_mask=LATENT_MASK))
    np.testing.assert_allclose(again, out, rtol=0, atol=1e-6)
    # Not a constant shift: the latent LayerNorm would remove it.
    real_changed = LATENTS.at[0, 0].set(jax.random.normal(jax.random.key(9), (LATENT_DIM,)))
    moved = np.asarray(model(IDS, latents=real_changed, latent_mask=LATENT_MASK))
    assert not np.allclose(moved[0], out[0], atol=1e-4)
    np.testing.assert_allclose(moved[1], out[1], rtol=0, atol=1e-6)


def test_one_latent_module_is_attention_over_one_key():
    """Built for L = 1 the module holds only the value path (no query norm, no q/k, which could
    never get a gradient) and computes what the general module's attention over that one key
    computes, a masked row included."""
    general = CrossAttention(64, LATENT_DIM, 32, 4, num_latents=2, rngs=nnx.Rngs(0))
    randomise_parameters(general, seed=5)
    one = CrossAttention(64, LATENT_DIM, 32, 4, rngs=nnx.Rngs(1))
    names = {"latent_norm.scale", "latent_norm.bias", "attn.v_proj.kernel", "attn.o_proj.kernel"}
    assert set(weights(one)) == names and one.norm is None
    shared = dict(nnx.to_flat_state(nnx.state(general, nnx.Param)))
    for path, var in nnx.to_flat_state(nnx.state(one, nnx.Param)):
        var.set_value(shared[path][...])

    x = jax.random.normal(jax.random.key(2), (3, 5, 64))
    latent = jax.random.normal(jax.random.key(3), (3, 1, LATENT_DIM))
    for mask in (jnp.array([[True], [False], [True]]), None):
        # The general path: query norm, q/k scores and softmax over the single key.
        reference = np.asarray(general.attn(general.norm(x), general.latent_norm(latent), mask))
        out = np.asarray(one(x, latent, mask))
        np.testing.assert_allclose(out, reference, rtol=1e-6, atol=1e-6)
        assert np.abs(reference[0]).min() > 0 and (mask is None) == bool(np.any(out[1]))
    with pytest.raises(AssertionError, match="num_latents = 1"):
        one(x, LATENTS[:1].repeat(3, axis=0))  # three latents into a one-latent module


def test_multi_head_masked_attention_equals_numpy():
    """Several latents, a different number masked in each row (one row none, one all)."""
    module = CrossAttention(64, LATENT_DIM, 32, 4, num_latents=5, norm_eps=1e-5, rngs=nnx.Rngs(0))
    randomise_parameters(module, seed=3)
    rng = np.random.RandomState(4)
    hidden = rng.randn(4, 6, 64).astype(np.float32)
    latents = rng.randn(4, 5, LATENT_DIM).astype(np.float32)
    mask = np.array(
        [[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=bool
    )
    out = np.asarray(module(jnp.asarray(hidden), jnp.asarray(latents), jnp.asarray(mask)))

    w = weights(module)
    reference = multi_head_attention(
        rms_norm(hidden.astype(np.float64), w["norm.scale"], 1e-5),
        layer_norm(latents, w["latent_norm.scale"], w["latent_norm.bias"], 1e-5),
        mask,
        attention_weights(w, "attn"),
        num_heads=4,
    )
    assert np.abs(reference[:3]).min() > 0 and not reference[3].any()
    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_all_masked_row_gives_zero_without_nan():
    module = CrossAttention(64, LATENT_DIM, 32, 4, num_latents=L, rngs=nnx.Rngs(0))
    randomise_outputs(module)
    x = jax.random.normal(jax.random.key(1), (2, 5, 64))
    mask = jnp.array([[True, True, False], [False, False, False]])
    out = np.asarray(module(x, LATENTS, mask))
    assert np.all(out[1] == 0) and np.any(out[0] != 0)

    def loss(m):
        return jnp.sum(m(x, LATENTS, mask) ** 2)

    grads = nnx.jit(nnx.grad(loss))(module)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("num_latents", [1, L])
def test_cached_decoding_matches_full_forward(folder, num_latents):
    model = attach_cross_attention(
        load_backbone(folder), 3, LATENT_DIM, num_latents=num_latents, rngs=nnx.Rngs(0)
    )
    randomise_outputs(model)
    latents, mask = LATENTS[:, :num_latents], LATENT_MASK[:, :num_latents]

    # Compiled: op-by-op execution of the cached path costs several seconds on the CPU.
    @nnx.jit
    def forward(model, ids, cache):
        return model.forward(ids, cache=cache, latents=latents, latent_mask=mask)

    full, _ = forward(model, IDS, None)
    logits, cache = forward(model, IDS[:, :8], model.init_cache(2, IDS.shape[1]))
    steps = [logits]
    for i in range(8, IDS.shape[1]):
        logits, cache = forward(model, IDS[:, i : i + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def test_attach_errors(folder):
    model = load_backbone(folder)
    with pytest.raises(ValueError, match="last_n=4.*num_layers=3"):
        attach_cross_attention(model, last_n=4, latent_dim=LATENT_DIM, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head_dim"):
        attach_cross_attention(model, 1, LATENT_DIM, inner_dim=24, rngs=nnx.Rngs(0))
    attach_cross_attention(model, last_n=1, latent_dim=LATENT_DIM, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="layer 2 already has"):
        attach_cross_attention(model, last_n=1, latent_dim=LATENT_DIM, rngs=nnx.Rngs(0))
