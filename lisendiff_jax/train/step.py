"""The optimizer and the jitted training step.

The model's state is split three ways: the trainable parameters (differentiated, updated,
donated), everything else (frozen, never differentiated, no optimizer state), and the graph
definition (static). Only the first part gets gradients and Adam moments.
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


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """AdamW with the configured schedule, clipping and gradient accumulation.

    `total_steps` counts optimizer updates (after accumulation); decay schedules end there.
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
    chain.append(
        optax.adamw(
            schedule,
            weight_decay=config.weight_decay,
            mu_dtype=jnp.dtype(config.optimizer_state_dtype),
        )
    )
    tx = optax.chain(*chain)
    if config.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
    return tx


LossFn = Callable[
    [nnx.State, tuple[nnx.State, ...], dict[str, jax.Array], jax.Array],
    tuple[jax.Array, dict[str, jax.Array]],
]


def make_train_step(
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    shardings: tuple[Any, Any, Any, Any, jax.sharding.Sharding] | None = None,
) -> Callable[..., tuple[nnx.State, Any, dict[str, jax.Array]]]:
    """A jitted `step(trainable, frozen, opt_state, batch, rng) -> (trainable, opt_state,
    metrics)`. `loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)` is differentiated
    with respect to `trainable` only; `frozen` (a tuple of the model's other states) gets no
    gradient. `trainable` and `opt_state` are donated: use the returned ones.

    On a mesh, `shardings` gives the shardings of (trainable, frozen, opt_state, batch, rng)
    (trees, or prefixes of them, as `jax.jit` takes): the updated parameters and optimizer
    state keep theirs, and the metrics are replicated."""
    jit_kw = {}
    if shardings is not None:
        trainable_sh, _, opt_sh, _, replicated = shardings
        jit_kw = dict(in_shardings=shardings, out_shardings=(trainable_sh, opt_sh, replicated))

    @functools.partial(jax.jit, donate_argnums=(0, 2), **jit_kw)
    def step(trainable, frozen, opt_state, batch, rng):
        (total, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, frozen, batch, rng
        )
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = dict(metrics, loss=total, grad_norm=optax.global_norm(grads))
        return trainable, opt_state, metrics

    return step
