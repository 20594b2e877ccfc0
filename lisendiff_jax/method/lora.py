"""Low-rank adapters on the backbone's projections (PEFT semantics).

`apply_lora` replaces each targeted `nnx.Linear` of every decoder layer by a `LoRALinear` that
keeps the original as its `base` submodule and computes

    base(x) + (alpha / rank) * dropout(x) @ A @ B

A [in, rank] is initialised like PEFT (kaiming-uniform, bound 1/sqrt(in)) and B [rank, out] is
zero, so the adapted model starts equal to the backbone.

Parameter paths: the base weights move from `layers.{i}.self_attn.q_proj.kernel` to
`layers.{i}.self_attn.q_proj.base.kernel` (still `nnx.Param`); the adapters are
`layers.{i}.self_attn.q_proj.lora_{a,b}` and are `nnx.LoRAParam`. `nnx.LoRAParam` subclasses
`nnx.Param`, so select adapters with the filter `nnx.LoRAParam` and frozen weights with
`nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`. `merge_lora` folds the adapters back and restores
the original paths, so a merged model exports with the backbone's checkpoint names.

Dropout starts disabled (eval mode); `model.train()` enables it and `model.eval()` disables it
again. Its random stream lives in `nnx.RngState` variables at `...q_proj.dropout.rngs`, which a
jitted train step must carry in and out like any other non-trainable state.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from lisendiff_jax.backbone.layout import PROJECTIONS
from lisendiff_jax.backbone.model import Decoder, projection_slots
from lisendiff_jax.backbone.quantized import QuantizedLinear, dequantize_projections

# torch's kaiming_uniform_(a=sqrt(5)), PEFT's init for A: uniform in +-1/sqrt(fan_in).
_kaiming_uniform = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class LoRALinear(nnx.Module):
    """A frozen `nnx.Linear` (or `QuantizedLinear`) plus a trainable low-rank update, computed
    in the base's dtype."""

    def __init__(
        self,
        base: nnx.Linear | QuantizedLinear,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.rank, self.scale = rank, alpha / rank
        shape_a = (base.in_features, rank)
        self.lora_a = nnx.LoRAParam(_kaiming_uniform(rngs.params(), shape_a, param_dtype))
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, base.out_features), param_dtype))
        self.dropout = nnx.Dropout(dropout, deterministic=True, rngs=rngs if dropout else None)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        chex.assert_axis_dimension(x, -1, self.base.in_features)
        dtype = self.base.dtype or x.dtype
        a = self.lora_a[...].astype(dtype)  # [in, rank]
        b = self.lora_b[...].astype(dtype)  # [rank, out]
        update = (self.dropout(x).astype(dtype) @ a) @ b
        return self.base(x) + self.scale * update

    def merged_kernel(self) -> jax.Array:
        """W + scale * A @ B [in, out], summed in float32 and stored in the base's parameter
        dtype (a quantized W is de-quantized to float32 first)."""
        if isinstance(self.base, QuantizedLinear):
            kernel, dtype = self.base.float_kernel(), self.base.param_dtype
        else:
            kernel = self.base.kernel[...]
            dtype = kernel.dtype
        delta = self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32)
        return (kernel.astype(jnp.float32) + self.scale * delta).astype(dtype)


def _projections(model: Decoder) -> list[tuple[nnx.Module, str]]:
    """(block, attribute name) of every adaptable projection, all layers."""
    return [slot for layer in model.layers for slot in projection_slots(layer)]


def apply_lora(
    model: Decoder,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    rank: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.1,
    *,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> Decoder:
    """Wraps the `targets` projections of every layer in a `LoRALinear`, in place; returns
    `model`. Defaults are the paper's (rank 16, alpha 32, dropout 0.1, q_proj and v_proj)."""
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown:
        raise ValueError(
            f"unknown LoRA target(s) {', '.join(map(repr, unknown))}; "
            f"valid targets are {', '.join(PROJECTIONS)}"
        )
    if not targets:
        raise ValueError(f"no LoRA targets given; valid targets are {', '.join(PROJECTIONS)}")
    for block, name in _projections(model):
        if name not in targets:
            continue
        base = getattr(block, name)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter; merge_lora first")
        lora = LoRALinear(
            base, rank=rank, alpha=alpha, dropout=dropout, param_dtype=param_dtype, rngs=rngs
        )
        setattr(block, name, lora)
    return model


def merge_lora(model: Decoder) -> Decoder:
    """Folds every adapter into its base kernel and puts the plain `nnx.Linear` back, in place;
    returns `model`, now a plain Decoder with the original parameter paths.

    A quantized base becomes a float `nnx.Linear` of W de-quantized plus the update, and the
    projections without adapters are de-quantized too: the merged model holds the float
    weights an export writes (inference from a workdir keeps a quantized base unmerged,
    `infer.restore.for_inference`).

    In place because the backbone is large; `nnx.clone` the model first to keep the adapters.
    """
    for block, name in _projections(model):
        lora = getattr(block, name)
        if isinstance(lora, LoRALinear):
            if isinstance(lora.base, QuantizedLinear):
                setattr(block, name, lora.base.to_linear(lora.merged_kernel()))
            else:
                lora.base.kernel.set_value(lora.merged_kernel())
                setattr(block, name, lora.base)
    return dequantize_projections(model)
