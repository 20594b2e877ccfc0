"""How an optimizer update lands on a trained low-precision (bf16 or fp16) parameter.

With `model.param_dtype = "bfloat16"` the trained LM head is bf16. Near 0.02 the spacing of bf16
numbers is 1.2e-4, so an Adam step of lr 1e-4 added to it and rounded to the nearest bf16 is
most often no step at all. `model.low_precision_update` chooses what happens instead:

    stochastic      the float32 sum p + u is rounded up or down with probability proportional
                    to its distance from each neighbour, so that on average the parameter
                    follows the float32 sum. No extra memory; the random bits come from a
                    key and step count in the optimizer state (`step_key`), so a resumed
                    run rounds exactly as an uninterrupted one.
    nearest         plain rounding to nearest: small updates vanish (kept for comparison).
    float32_master  the optimizer updates a float32 copy of each low-precision parameter, kept
                    in its state (`MasterState`), and the parameter is that copy rounded to
                    nearest: 4 more bytes per low-precision parameter.

float32 parameters are updated exactly as `optax.apply_updates` does, in every mode.

Adam's moments have the same problem: optax keeps `nu` in the parameter's dtype, and with
b2 = 0.999 each step changes a bf16 `nu` by 0.1%, below half its spacing (0.2-0.4%), so rounded
to nearest it freezes. In the stochastic mode `scale_by_adam` computes moments in float32 and
writes the low-precision ones back stochastically rounded (float32 ones exactly as optax does).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend.random import threefry2x32_p

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_low_precision(x: jax.Array) -> bool:
    return jnp.dtype(x.dtype) in LOW_PRECISION


# One threefry hash per element gives 64 random bits, and a rounding takes 16 of them: a
# low-precision leaf's three roundings in a step (Adam's mu and nu, then the parameter) each
# take their own 16-bit lane of the same hash. Their keys are the same (`step_key`), so XLA
# merges the three identical hashes into one. Why it matters: at 8B the bf16 LM head's update
# is one element-wise kernel, which took 6 ms of an H200's 57 ms step when it hashed each
# element three times (its integer work, 20 rounds a hash, is most of that kernel's code).
MU_LANE, NU_LANE, PARAM_LANE = 0, 1, 2


def random_lane(key: jax.Array, shape: tuple[int, ...], lane: int) -> jax.Array:
    """uint32 array of `shape` holding 16 uniform random bits per element (values in
    [0, 2**16)): lane `lane` (0-3) of the 64-bit threefry-2x32 hash of each element's index
    under `key`. Different lanes of one key are independent, and cost one hash together
    when computed in the same jitted function (`jax.random.bits` would hash once per 32-bit
    value and could not share it).

    The hash's two counter words are an element's index along the first axis and its flat
    index in the others: elementwise and global, so any sharding of the array gives the same
    bits. Raises ValueError when the trailing axes hold 2**32 elements or more."""
    if not 0 <= lane < 4:
        raise ValueError(f"lane must be 0-3, got {lane}")
    trailing = int(np.prod(shape[1:]))
    if trailing >= 2**32:
        raise ValueError(f"random_lane: shape {shape} has too many elements past the first axis")
    first = jax.lax.broadcasted_iota(jnp.uint32, shape, 0) if shape else jnp.uint32(0)
    rest = jnp.zeros(shape, jnp.uint32)
    for axis in range(1, len(shape)):  # row-major flat index of the trailing axes
        rest = rest * jnp.uint32(shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    k = jax.random.key_data(key)  # uint32 [2]
    words = threefry2x32_p.bind(k[0], k[1], first, rest)
    word = words[lane // 2]
    return word >> 16 if lane % 2 == 0 else word & jnp.uint32(0xFFFF)


def stochastic_round(x: jax.Array, dtype: jnp.dtype, key: jax.Array, lane: int = 0) -> jax.Array:
    """float32 `x` rounded to `dtype` (bf16 or fp16), up or down at random so that the
    expected result is `x`, with the random bits of `random_lane(key, x.shape, lane)`.

    Uniform random bits are added below the kept mantissa of x's float32 bit pattern and the
    rest is cut off: x rounds away from zero exactly when the bits carry into the kept part,
    which happens with probability (|x| - |down|) / spacing. Values already representable in
    `dtype` stay as they are. For fp16 this is exact within its normal range; below it (|x| <
    6.1e-5, fp16's subnormals) the final cast rounds to nearest.

    Everything here is elementwise, so shardings carry through, and on GPU XLA fuses the
    random bits (threefry, unrolled there) into the update: no array of the weight's size is
    added. (On CPU, JAX's threefry is a loop whose intermediate arrays are materialised.)
    """
    dropped = jnp.finfo(jnp.float32).nmant - jnp.finfo(dtype).nmant  # 16 for bf16, 13 for fp16
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = random_lane(key, x.shape, lane) >> (16 - dropped)  # [0, 2**dropped)
    kept = (bits + noise) & ~jnp.uint32((1 << dropped) - 1)
    return jax.lax.bitcast_convert_type(kept, jnp.float32).astype(dtype)


def apply_updates(params: Any, updates: Any, key: jax.Array | None, stochastic: bool = True) -> Any:
    """`optax.apply_updates`, except that with `stochastic` each low-precision leaf gets its
    float32 sum stochastically rounded (a key per leaf, folded from `key`, in `PARAM_LANE`;
    the train step passes `step_key(opt_state)`, so the moments' hash serves here too)."""
    leaves, treedef = jax.tree.flatten(params)
    new = [
        stochastic_round(
            p.astype(jnp.float32) + u.astype(jnp.float32),
            p.dtype,
            jax.random.fold_in(key, i),
            PARAM_LANE,
        )
        if stochastic and is_low_precision(p)
        else optax.apply_updates(p, u)
        for i, (p, u) in enumerate(zip(leaves, treedef.flatten_up_to(updates), strict=True))
    ]
    return treedef.unflatten(new)


class MasterState(NamedTuple):
    """The state of `float32_master(tx)`: tx's own state, and the parameters' tree holding a
    float32 copy of each low-precision leaf (None for the others)."""

    inner: optax.OptState
    master: Any


def float32_master(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` applied to float32 copies of the low-precision parameters.

    `tx` is given the float32 copies as the parameters (for weight decay) and keeps its own
    state as it would for the parameters themselves (Adam's moments in their dtypes); the
    copies, updated in float32, are in `MasterState.master`, and `from_masters` makes the
    parameters from them after each update."""

    def init(params: Any) -> MasterState:
        master = jax.tree.map(
            lambda p: p.astype(jnp.float32) if is_low_precision(p) else None, params
        )
        return MasterState(tx.init(params), master)

    def update(grads: Any, state: MasterState, params: Any = None) -> tuple[Any, MasterState]:
        full = _replace(state.master, params, lambda m, p: m)
        updates, inner = tx.update(grads, state.inner, full)
        new = optax.apply_updates(full, updates)
        master = jax.tree.map(
            lambda m, n: None if m is None else n, state.master, new, is_leaf=_is_none
        )
        return updates, MasterState(inner, master)

    return optax.GradientTransformation(init, update)


def from_masters(params: Any, master: Any) -> Any:
    """`params` with each low-precision leaf replaced by its float32 master rounded to nearest."""
    return _replace(master, params, lambda m, p: m.astype(p.dtype))


def _replace(master: Any, params: Any, fn: Any) -> Any:
    return jax.tree.map(lambda m, p: p if m is None else fn(m, p), master, params, is_leaf=_is_none)


def _is_none(x: Any) -> bool:
    return x is None


# The stochastic roundings' key is `fold_in(key(seed), ROUNDING_STREAM)`; the trainer's step
# keys are `fold_in(key(seed), step)`, so the constant must stay clear of any step count.
ROUNDING_STREAM = 0xADA_3011


class ScaleByAdamState(NamedTuple):
    """optax's ScaleByAdamState, and the key (uint32 key data, as checkpoints hold it) that the
    stochastic roundings of the moments and the parameters fold `count` into (`step_key`)."""

    count: jax.Array  # int32 []
    mu: Any
    nu: Any
    key: jax.Array  # uint32 [2]: the key data of the default PRNG


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    """`optax.scale_by_adam`, except that a moment stored in bf16 or fp16 is updated in float32
    and stochastically rounded back (a key per step and leaf, from the state's key and count:
    deterministic, saved with the state, the same after a resume; mu and nu take their own
    lanes of the leaf's hash, `MU_LANE` and `NU_LANE`).

    float32 moments and every update are computed exactly as optax computes them from
    float32 inputs; each update is cast to the dtype optax would give it (bf16 for a bf16
    parameter with bf16 moments), so no temporary is larger than optax's."""
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init(params: Any) -> ScaleByAdamState:
        key = jax.random.fold_in(jax.random.key(seed), ROUNDING_STREAM)
        return ScaleByAdamState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=optax.tree.zeros_like(params),
            key=jax.random.key_data(key),
        )

    def update(
        updates: Any, state: ScaleByAdamState, params: Any = None
    ) -> tuple[Any, ScaleByAdamState]:
        del params
        grads = _float32(updates)
        mu = optax.tree.update_moment(grads, _float32(state.mu), b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(grads, _float32(state.nu), b2, 2)
        count = optax.safe_increment(state.count)
        mu_hat = optax.tree.bias_correction(mu, b1, count)
        nu_hat = optax.tree.bias_correction(nu, b2, count)
        new = jax.tree.map(
            lambda m, v, g, m0, v0: (m / (jnp.sqrt(v + eps_root) + eps)).astype(
                jnp.result_type(g, m0, v0)
            ),
            mu_hat,
            nu_hat,
            updates,
            state.mu,
            state.nu,
        )
        key = _rounding_key(state)
        mu = _store(mu, state.mu, key, MU_LANE)
        nu = _store(nu, state.nu, key, NU_LANE)
        return new, ScaleByAdamState(count, mu, nu, state.key)

    return optax.GradientTransformation(init, update)


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    mu_dtype: Any = None,
    seed: int = 0,
) -> optax.GradientTransformation:
    """`optax.adamw` (default b1, b2, eps) built on this module's `scale_by_adam`."""
    return optax.chain(
        scale_by_adam(mu_dtype=mu_dtype, seed=seed),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def _float32(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _rounding_key(state: ScaleByAdamState) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)


def step_key(opt_state: Any) -> jax.Array:
    """The key of a step's stochastic roundings, from the `scale_by_adam` state in
    `opt_state` (the state before the step's update): the key its moments are rounded with,
    which `apply_updates` must be given for the parameters' roundings to share their hash."""
    states = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ScaleByAdamState))
        if isinstance(s, ScaleByAdamState)
    ]
    if len(states) != 1:
        raise ValueError(
            f"stochastic rounding needs one rounding.scale_by_adam state, found {len(states)}: "
            "build the optimizer with make_optimizer"
        )
    return _rounding_key(states[0])


def _store(moment: Any, old: Any, key: jax.Array, lane: int) -> Any:
    """The float32 `moment` in `old`'s dtypes: stochastically rounded where low precision (a
    key per leaf, folded from `key`, in `lane`), cast otherwise."""
    leaves, treedef = jax.tree.flatten(old)
    return treedef.unflatten(
        [
            stochastic_round(m, o.dtype, jax.random.fold_in(key, i), lane)
            if is_low_precision(o)
            else m.astype(o.dtype)
            for i, (m, o) in enumerate(zip(treedef.flatten_up_to(moment), leaves, strict=True))
        ]
    )
