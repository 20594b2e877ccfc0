"""Updates of low-precision trained weights (a bf16 LM head): stochastic rounding follows the
float32 sum where rounding to nearest loses it, float32 weights are untouched, and the train
step takes each `model.low_precision_update` path."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lisendiff_jax.backbone import BackboneConfig
from lisendiff_jax.backbone.model import Decoder
from lisendiff_jax.backbone.presets import LLAMA_3_1_8B
from lisendiff_jax.config import base_config
from lisendiff_jax.method.model import LisenDiff, split_for_training, training_loss
from lisendiff_jax.train import rounding
from lisendiff_jax.train.rounding import MasterState, apply_updates, stochastic_round
from lisendiff_jax.train.step import make_optimizer, make_train_step, optimizer_update

SPACING = 2.0**-13  # between bf16 numbers in [2**-6, 2**-5), i.e. around 0.02
D_ENC = 8


def head_like(n: int, seed: int = 0) -> jax.Array:
    """bf16 weights of magnitude 0.016-0.031, random signs: inside one binade, so that one
    step up or down is always one SPACING."""
    rng = np.random.RandomState(seed)
    low, high = 2.0**-6 + 2 * SPACING, 2.0**-5 - 2 * SPACING
    values = rng.uniform(low, high, n) * rng.choice([-1, 1], n)
    return jnp.asarray(values, jnp.bfloat16)


@jax.jit
def many_small_updates(p0: jax.Array, u: jax.Array, key: jax.Array) -> tuple[jax.Array, ...]:
    """1000 steps of `u` (float32) on p0: stochastically rounded, rounded to nearest, and the
    float32 reference."""

    def body(i, ps):
        sr, nearest, ref = ps
        sr = apply_updates(sr, u, jax.random.fold_in(key, i), stochastic=True)
        nearest = apply_updates(nearest, u, key, stochastic=False)
        return sr, nearest, ref + u

    return jax.lax.fori_loop(0, 1000, body, (p0, p0, p0.astype(jnp.float32)))


def test_many_small_updates_track_float32_in_expectation_where_nearest_stays_put():
    p0 = head_like(4096)
    sign = jnp.sign(p0.astype(jnp.float32))
    u = 1e-5 * sign  # each a twelfth of the spacing: rounded to nearest, it is no step at all
    sr, nearest, ref = many_small_updates(p0, u, jax.random.key(0))
    total = 1000 * 1e-5
    np.testing.assert_array_equal(np.asarray(nearest), np.asarray(p0))
    assert sr.dtype == jnp.bfloat16
    moved = np.asarray(sign * (sr.astype(jnp.float32) - p0.astype(jnp.float32)))
    # Each weight moved by whole spacings, on average by the float32 total (per weight the
    # rounding noise is about 0.2 of the total; over 4096 weights its mean is 0.003).
    np.testing.assert_allclose(moved.mean(), total, rtol=0.02)
    error = np.asarray(sr.astype(jnp.float32) - ref)
    assert abs(error.mean()) < 0.02 * total
    assert np.abs(error).mean() < 0.3 * total


def test_stochastic_rounding_is_unbiased_and_keeps_representable_values():
    key = jax.random.key(1)
    down = float(jnp.bfloat16(0.02))
    x = jnp.full((200_000,), down + 0.3 * SPACING, jnp.float32)  # 0.3 of the way up
    for sign in (1.0, -1.0):
        r = np.asarray(stochastic_round(sign * x, jnp.bfloat16, key).astype(jnp.float32))
        assert set(np.abs(np.unique(r))) == {down, down + SPACING}
        # The mean's noise is 1.2e-7 (0.001 spacing); a bias of any size would show.
        np.testing.assert_allclose(r.mean(), sign * float(x[0]), rtol=0, atol=0.01 * SPACING)
    exact = jnp.array([0.0, -0.0, 1.0, -3.5, 2.0**-130, jnp.inf, -jnp.inf], jnp.bfloat16)
    again = stochastic_round(exact.astype(jnp.float32), jnp.bfloat16, key)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(exact))
    # fp16 keeps 10 mantissa bits: the same on its own grid.
    h = jnp.full((200_000,), 1.0 + 0.25 * 2.0**-10, jnp.float32)
    r16 = np.asarray(stochastic_round(h, jnp.float16, key).astype(jnp.float32))
    assert set(np.unique(r16)) == {1.0, 1.0 + 2.0**-10}
    np.testing.assert_allclose(r16.mean(), float(h[0]), rtol=0, atol=0.01 * 2.0**-10)


def test_float32_leaves_are_updated_exactly_as_optax_does():
    rng = np.random.RandomState(2)
    params = {
        "f32": jnp.asarray(rng.randn(64, 32), jnp.float32),
        "bf16": head_like(2048).reshape(64, 32),
    }
    updates = {k: jnp.asarray(rng.randn(64, 32) * 1e-5, jnp.float32) for k in params}
    expected = optax.apply_updates(params, updates)
    stochastic = apply_updates(params, updates, jax.random.key(3), stochastic=True)
    nearest = apply_updates(params, updates, jax.random.key(3), stochastic=False)
    for new in (stochastic, nearest):
        np.testing.assert_array_equal(np.asarray(new["f32"]), np.asarray(expected["f32"]))
        assert new["bf16"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(nearest["bf16"]), np.asarray(expected["bf16"]))


def test_stochastic_rounding_on_a_mesh_keeps_the_sharding_and_the_numbers():
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = jax.sharding.Mesh(devices, ("fsdp", "tensor"))
    sharding = NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))
    p, u = head_like(64 * 128).reshape(64, 128), jnp.full((64, 128), 1e-5, jnp.float32)
    key = jax.random.key(4)
    # No out_shardings: the result's sharding is what the computation propagates.
    step = jax.jit(functools.partial(apply_updates, stochastic=True))
    sharded = step(jax.device_put(p, sharding), jax.device_put(u, sharding), key)
    assert sharded.sharding.is_equivalent_to(sharding, 2)
    assert sharded.addressable_shards[0].data.shape == (32, 32)
    single = apply_updates(p, u, key, stochastic=True)
    np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))
    assert not np.array_equal(np.asarray(single), np.asarray(p))


def test_random_lanes_are_uniform_independent_16_bit_words():
    key = jax.random.key(5)
    shape = (300, 700)
    lanes = np.stack([np.asarray(rounding.random_lane(key, shape, i)) for i in range(4)])
    assert lanes.dtype == np.uint32 and lanes.shape == (4, *shape)
    assert lanes.max() < 2**16
    # Each of the 16 bits of each lane is set half the time (noise 0.0009 at 210,000 values).
    bits = (lanes[..., None] >> np.arange(16)) & 1
    np.testing.assert_allclose(bits.mean(axis=(1, 2)), 0.5, atol=0.005)
    # No two lanes, and no lane and its neighbour along either axis, are correlated.
    corr = np.corrcoef(lanes.reshape(4, -1).astype(np.float64))
    assert np.abs(corr - np.eye(4)).max() < 0.01
    for lane in lanes.astype(np.float64):
        assert abs(np.corrcoef(lane[:, 1:].ravel(), lane[:, :-1].ravel())[0, 1]) < 0.01
        assert abs(np.corrcoef(lane[1:].ravel(), lane[:-1].ravel())[0, 1]) < 0.01
    other = np.asarray(rounding.random_lane(jax.random.key(6), shape, 0))
    assert (other == lanes[0]).mean() < 0.001
    for other_shape in ((), (5,), (2, 3, 4)):  # one value per element, distinct across elements
        values = np.asarray(rounding.random_lane(key, other_shape, 1))
        assert values.shape == other_shape and len(np.unique(values)) == values.size
    with pytest.raises(ValueError, match="lane must be 0-3"):
        rounding.random_lane(key, shape, 4)


def test_a_low_precision_leaf_is_hashed_once_for_its_three_roundings():
    """Adam's bf16 mu and nu and the bf16 parameter take three lanes of one hash: the compiled
    update computes one threefry hash over the head's shape (XLA:CPU runs each as a loop over
    the array), not one per rounding. The f32 leaf's bf16 mu takes one of its own."""
    config = base_config()
    config.optimizer_state_dtype = "bfloat16"
    tx = make_optimizer(config, 10)
    params = {"head": jnp.zeros((64, 96), jnp.bfloat16), "lora": jnp.zeros((8, 16), jnp.float32)}
    update = jax.jit(functools.partial(optimizer_update, tx, low_precision_update="stochastic"))
    hlo = update.lower(params, tx.init(params), params).compile().as_text()
    hashes = [line for line in hlo.splitlines() if " while(" in line]
    assert sum("u32[64,96]" in line for line in hashes) == 1
    assert sum("u32[8,16]" in line for line in hashes) == 1


# -- Adam's moments -------------------------------------------------------------------------


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("mu_dtype", [jnp.float32, jnp.bfloat16])
def test_adamw_on_float32_params_is_optax_adamw(mu_dtype):
    """float32 moments: bit for bit. A bfloat16 mu: in expectation (optax rounds it to nearest,
    this adamw stochastically), so its mean over copies of one weight equals the float32 mu."""
    rng = np.random.RandomState(6)
    params = {"w": jnp.asarray(rng.randn(4096), jnp.float32), "b": jnp.zeros(4096, jnp.float32)}
    ours = rounding.adamw(1e-3, weight_decay=0.01, mu_dtype=mu_dtype)
    ref = optax.adamw(1e-3, weight_decay=0.01, mu_dtype=mu_dtype)
    exact = optax.adamw(1e-3, weight_decay=0.01, mu_dtype=jnp.float32)
    states, ps = [tx.init(params) for tx in (ours, ref, exact)], [params] * 3
    assert nbytes(states[0]) == nbytes(states[1]) + 8  # the key: no other memory
    for _ in range(6):
        # One gradient per step for all copies of "b": their moments have one float32 value.
        g = {"w": jnp.asarray(rng.randn(4096), jnp.float32), "b": jnp.full(4096, rng.randn())}
        for i, tx in enumerate((ours, ref, exact)):
            u, states[i] = jax.jit(tx.update)(g, states[i], ps[i])
            ps[i] = optax.apply_updates(ps[i], u)
    (ours_p, ref_p, _), (ours_s, ref_s, exact_s) = ps, (s[0] for s in states)
    if mu_dtype == jnp.float32:
        for got, want in [(ours_p, ref_p), (ours_s.mu, ref_s.mu), (ours_s.nu, ref_s.nu)]:
            for k in params:
                np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
        return
    assert ours_s.mu["b"].dtype == jnp.bfloat16
    mu = np.asarray(ours_s.mu["b"].astype(jnp.float32))
    assert len(np.unique(mu)) > 1  # rounded up or down, copy by copy
    # The mean's noise is about 1e-4 of mu; optax's own bf16 mu is off by up to 0.4%.
    np.testing.assert_allclose(mu.mean(), float(exact_s.mu["b"][0]), rtol=1e-3)
    np.testing.assert_array_equal(np.asarray(ours_s.nu["w"]), np.asarray(exact_s.nu["w"]))
    for k in params:  # the updates use the float32 mu before it is rounded for storage
        np.testing.assert_allclose(np.asarray(ours_p[k]), np.asarray(ref_p[k]), atol=1e-4)


@functools.partial(jax.jit, static_argnums=(0, 1))
def toy_adam(tx: optax.GradientTransformation, dtype, first: int, steps: int):
    """Adam on 1024 weights of `dtype` with gradient 1e-3 for `first` steps, then 1e-4: nu
    after `first // 2` and after `steps` steps, and the last update (before the learning rate)."""
    p = jnp.zeros(1024, dtype)

    def body(i, carry):
        state, half, _ = carry
        g = jnp.where(i < first, 1e-3, 1e-4).astype(dtype) * jnp.ones_like(p)
        u, state = tx.update(g, state, p)
        half = jnp.where(i == first // 2 - 1, state.nu, half)
        return state, half, u.astype(jnp.float32)

    zeros = jnp.zeros(1024, jnp.float32)
    state, half, u = jax.lax.fori_loop(0, steps, body, (tx.init(p), p, zeros))
    return half.astype(jnp.float32), state.nu.astype(jnp.float32), u


def test_a_bf16_nu_tracks_float32_where_rounding_to_nearest_stalls():
    first, steps = 1000, 3000
    _, ref_nu, ref_u = toy_adam(optax.scale_by_adam(), jnp.float32, first, steps)
    half, nearest_nu, nearest_u = toy_adam(optax.scale_by_adam(), jnp.bfloat16, first, steps)
    _, nu, u = toy_adam(rounding.scale_by_adam(), jnp.bfloat16, first, steps)
    ref_nu, ref_u = float(ref_nu[0]), float(ref_u[0])  # 9.4e-8 and 0.32 at step 3000
    # Rounded to nearest, nu stops at 4.77e-7 from step 500 on: 5x too large, the update half.
    np.testing.assert_array_equal(np.asarray(nearest_nu), np.asarray(half))
    assert float(nearest_nu[0]) > 4 * ref_nu and float(nearest_u[0]) < 0.5 * ref_u
    # Stochastically rounded, nu follows float32: on average within 1%, each weight within
    # its own rounding noise (about 9% rms, 5% in the update).
    rel = np.asarray(nu) / ref_nu - 1
    assert abs(rel.mean()) < 0.01 and np.sqrt((rel**2).mean()) < 0.15
    np.testing.assert_allclose(np.asarray(u).mean(), ref_u, rtol=0.02)


# -- the train step ------------------------------------------------------------------------


def tiny_config(mode: str):
    """LoRA-only on a random 2-layer Llama; lr 1e-5, a twelfth of the head's spacing."""
    c = base_config()
    c.learning_rate, c.model.low_precision_update = 1e-5, mode
    c.model.lisendiff, c.model.lora.dropout = False, 0.0
    return c


@pytest.fixture(scope="module")
def bf16_split():
    """The tiny model with bf16 weights (so a bf16 head, set to `head_like`), split for
    training."""
    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2)
    bc = BackboneConfig.from_hf_dict(
        dict(LLAMA_3_1_8B, **shape, num_attention_heads=4, num_key_value_heads=2)
    )
    decoder = Decoder(bc, dtype=jnp.float32, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    decoder.lm_head.kernel.set_value(head_like(64 * 128).reshape(64, 128))
    model = LisenDiff(decoder, tiny_config("nearest").model, D_ENC, rngs=nnx.Rngs(0))
    return split_for_training(model)


def train(split, mode: str, steps: int, tx_mode: str | None = None):
    """Parameters at each of `steps` train steps with `mode` on one batch (element 0: before),
    and the last optimizer state; the optimizer is built for `tx_mode`, the same by default."""
    graphdef, trainable, frozen = split
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates it
    tx = make_optimizer(tiny_config(tx_mode or mode), 10)
    opt_state = tx.init(trainable)
    step = make_train_step(tx, functools.partial(training_loss, graphdef), None, mode)
    rng = np.random.RandomState(5)
    ids = rng.randint(3, 128, (2, 12)).astype(np.int32)
    batch = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "loss_mask": np.ones_like(ids),
        "response_latent": rng.randn(2, 1, D_ENC).astype(np.float32),
    }
    snapshots = [{p: np.asarray(v[...]) for p, v in nnx.to_flat_state(trainable)}]
    for i in range(steps):
        rng_i = jax.random.key(i)
        trainable, opt_state, _ = step(trainable, frozen, opt_state, batch, rng_i)
        snapshots.append({p: np.asarray(v[...]) for p, v in nnx.to_flat_state(trainable)})
    return snapshots, opt_state


HEAD = ("backbone", "lm_head", "kernel")


def test_the_train_step_moves_a_bf16_head_where_nearest_rounding_would_not(bf16_split):
    nearest, _ = train(bf16_split, "nearest", 7)
    stochastic, _ = train(bf16_split, "stochastic", 1)
    master, state = train(bf16_split, "float32_master", 1)
    p0 = nearest[0][HEAD]
    assert p0.dtype == jnp.bfloat16
    np.testing.assert_array_equal(nearest[7][HEAD], p0)  # seven steps lost to rounding
    np.testing.assert_array_equal(master[1][HEAD], p0)  # the float32 copy moved, its bf16 not

    assert isinstance(state, MasterState)
    u = np.asarray(state.master["backbone"]["lm_head"]["kernel"][...]) - p0.astype(np.float32)
    assert (np.abs(u) > 0).mean() > 0.99 and np.abs(u).max() < 1.1e-5  # Adam: about lr each
    # Stochastic rounding moves some weights by one spacing, in the direction of the update,
    # as many as the float32 updates add up to.
    step = stochastic[1][HEAD].astype(np.float32) - p0.astype(np.float32)
    moved = step != 0
    grows = np.sign(u) == np.sign(p0)  # away from zero; rounding must not favour either way
    assert 0.04 < moved[grows].mean() < 0.13 and 0.04 < moved[~grows].mean() < 0.13
    np.testing.assert_array_equal(np.abs(step[moved]), SPACING)
    assert (np.sign(step[moved]) == np.sign(u[moved])).all()
    np.testing.assert_allclose((np.sign(u) * step).sum(), np.abs(u).sum(), rtol=0.15)

    # float32 parameters (LoRA) take the same first update whichever way bf16 rounds, to
    # float32 rounding: the three modes are three programs, which XLA may round differently,
    # and Adam's first step, lr * g / (|g| + eps), passes that on where |g| is near eps. A
    # ten-thousandth of lr is a fortieth of the error of rounding an lr-sized value to bf16.
    lr = tiny_config("nearest").learning_rate
    for path, value in nearest[1].items():
        if path != HEAD:
            assert value.dtype == np.float32
            for other in (stochastic, master):
                np.testing.assert_allclose(
                    other[1][path], value, rtol=1e-6, atol=1e-4 * lr, err_msg=str(path)
                )
            assert path[-1] != "lora_b" or not np.array_equal(value, nearest[0][path])


def test_a_float32_master_accumulates_steps_that_each_round_away(bf16_split):
    snapshots, state = train(bf16_split, "float32_master", 7)
    p0, head = snapshots[0][HEAD], snapshots[7][HEAD]
    master = np.asarray(state.master["backbone"]["lm_head"]["kernel"][...])
    assert master.dtype == np.float32
    np.testing.assert_array_equal(head, master.astype(jnp.bfloat16))
    # Seven steps of about lr = 1e-5 pass half a spacing (6.1e-5) for most weights.
    assert (head != p0).mean() > 0.5


def test_only_the_stochastic_mode_rounds_adam_moments_stochastically(bf16_split):
    _, trainable, _ = bf16_split
    for mode, kind in [
        ("stochastic", rounding.ScaleByAdamState),
        ("nearest", optax.ScaleByAdamState),
        ("float32_master", optax.ScaleByAdamState),
    ]:
        state = jax.eval_shape(make_optimizer(tiny_config(mode), 10).init, trainable)
        leaves = jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "nu"))
        adam = [s for s in leaves if hasattr(s, "nu")]
        assert len(adam) == 1 and type(adam[0]) is kind, mode
        assert adam[0].nu["backbone"]["lm_head"]["kernel"].dtype == jnp.bfloat16


def test_an_optimizer_built_for_another_mode_is_refused(bf16_split):
    with pytest.raises(ValueError, match="low_precision_update='stochastic' and the optimizer"):
        train(bf16_split, "stochastic", 1, tx_mode="float32_master")
    with pytest.raises(ValueError, match="low_precision_update='float32_master' and the opt"):
        train(bf16_split, "float32_master", 1, tx_mode="stochastic")
    with pytest.raises(ValueError, match="needs one rounding.scale_by_adam state, found 0"):
        train(bf16_split, "stochastic", 1, tx_mode="nearest")
