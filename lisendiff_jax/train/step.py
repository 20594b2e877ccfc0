"""The optimizer and the jitted training step.

The model's state is split three ways: the trainable parameters (differentiated, updated,
donated), everything else (frozen, never differentiated, no optimizer state), and the graph
definition (static). Only the first part gets gradients and Adam moments. How an update
lands on a trained bf16 parameter (the LM head of a bf16 backbone) is `model.low_precision_update`
(see rounding.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from lisendiff_jax.method.model import TRAINABLE_MODULES
from lisendiff_jax.train import rounding
from lisendiff_jax.train.rounding import MasterState, apply_updates, float32_master, from_masters


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """AdamW with the configured schedule, clipping and gradient accumulation, on float32
    master copies of the low-precision parameters when `model.low_precision_update` is
    "float32_master", with stochastically rounded low-precision moments when it is "stochastic"
    (rounding.adamw).

    `total_steps` counts optimizer updates (after accumulation); decay schedules end there.
    `modules_learning_rate`, when set, is the LisenDiff modules' peak rate on the same schedule.
    """
    peak, warmup = config.learning_rate, config.warmup_steps
    decay_steps = max(total_steps - warmup, 1)
    if config.lr_schedule == "constant":
        after = optax.constant_schedule(peak)
    elif config.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    schedule = (
        optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])
        if warmup
        else after
    )
    chain = []
    if config.clip_grad_norm > 0:
        chain.append(optax.clip_by_global_norm(config.clip_grad_norm))
    mu_dtype = jnp.dtype(config.optimizer_state_dtype)
    if config.model.low_precision_update == "stochastic":
        # Adam's bf16 moments (the bf16 head's nu, every mu in bfloat16) stochastically rounded.
        chain.append(rounding.adamw(schedule, config.weight_decay, mu_dtype, config.seed))
    else:
        chain.append(optax.adamw(schedule, weight_decay=config.weight_decay, mu_dtype=mu_dtype))
    modules_rate = config.modules_learning_rate or peak
    if modules_rate != peak:
        chain.append(scale_modules(modules_rate / peak))
    tx = optax.chain(*chain)
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    if config.model.low_precision_update == "float32_master":
        tx = float32_master(tx)
    return tx


def scale_modules(factor: float) -> optax.GradientTransformation:
    """Multiplies the updates of the LisenDiff modules' parameters (`TRAINABLE_MODULES`) by
    `factor` and passes LoRA's and the LM head's through: after Adam, a per-group learning
    rate on one schedule, with no second optimizer state."""
    modules = set(TRAINABLE_MODULES)

    def scale(path: tuple, update: jax.Array) -> jax.Array:
        names = {getattr(key, "key", getattr(key, "name", None)) for key in path}
        return update * factor if names & modules else update

    def update_fn(updates, state, params=None):
        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


LossFn = Callable[
    [nnx.State, tuple[nnx.State, ...], dict[str, jax.Array], jax.Array],
    tuple[jax.Array, dict[str, jax.Array]],
]


def make_train_step(
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    shardings: tuple[Any, Any, Any, Any, jax.sharding.Sharding] | None = None,
    low_precision_update: str = "stochastic",
) -> Callable[..., tuple[nnx.State, Any, dict[str, jax.Array]]]:
    """A jitted `step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state,
    metrics)`. `loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)` is differentiated
    with respect to `trainable` only; `frozen` (a tuple of the model's other states) gets no
    gradient. `trainable` and `opt_state` are donated: use the returned ones.

    On a mesh, `shardings` gives the shardings of (trainable, frozen, opt_state, batch, rng)
    (trees, or prefixes of them, as `jax.jit` takes): the updated parameters and optimizer
    state keep theirs, and the metrics are replicated.

    `low_precision_update` (the config's `model.low_precision_update`) says how updates land on
    bf16/fp16 parameters: "stochastic" rounding with the optimizer state's key (the one its
    bf16 moments are rounded with: `rounding.step_key`), rounding to
    "nearest", or "float32_master", where `tx` must be make_optimizer's float32-master
    optimizer and the parameters are its float32 copies rounded. float32 parameters are
    updated as `optax.apply_updates` does in every case."""
    jit_kw = {}
    if shardings is not None:
        trainable_sh, _, opt_sh, _, replicated = shardings
        jit_kw = dict(in_shardings=shardings, out_shardings=(trainable_sh, opt_sh, replicated))

    @functools.partial(jax.jit, donate_argnums=(0, 2), **jit_kw)
    def step(trainable, frozen, opt_state, batch, rng):
        (total, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, frozen, batch, rng
        )
        trainable, opt_state = optimizer_update(
            tx, grads, opt_state, trainable, low_precision_update
        )
        metrics = dict(metrics, loss=total, grad_norm=optax.global_norm(grads))
        return trainable, opt_state, metrics

    return step


def optimizer_update(
    tx: optax.GradientTransformation,
    grads: Any,
    opt_state: Any,
    trainable: Any,
    low_precision_update: str = "stochastic",
) -> tuple[Any, Any]:
    """The step's optimizer update, traced inside it: `(trainable, opt_state)` after `tx`
    on `grads`, landed on the low-precision parameters as `low_precision_update` says
    (`make_train_step`), with the rounding key of the optimizer state (`rounding.step_key`)."""
    updates, new_state = tx.update(grads, opt_state, trainable)
    if (low_precision_update == "float32_master") != isinstance(new_state, MasterState):
        raise ValueError(
            f"low_precision_update={low_precision_update!r} and the optimizer disagree: "
            "build both from the same config (make_optimizer)"
        )
    if isinstance(new_state, MasterState):
        return from_masters(optax.apply_updates(trainable, updates), new_state.master), new_state
    if low_precision_update != "stochastic":
        return apply_updates(trainable, updates, None, stochastic=False), new_state
    return apply_updates(trainable, updates, rounding.step_key(opt_state)), new_state
