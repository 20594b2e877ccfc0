"""A frozen backbone whose decoder projections are stored quantized (int8, int4 or nf4), by qwix.

Only the `PROJECTIONS` of the decoder layers (q/k/v/o, gate/up/down: about 87% of an 8B
model's weights) are quantized; embeddings, norms, the LM head and everything LisenDiff adds
keep their dtypes. qwix does the quantizing and de-quantizing (`qwix.quantize`,
`qwix.dequantize`); this module only decides how and holds qwix's pieces.

How (`kernel` is [in, out], quantized from its value in the backbone's `param_dtype`):
- int8: one scale per output channel (absmax over the whole input axis), as qwix's own
  weight quantization does for a dot's non-contracting axis;
- int4 and nf4: one scale per output channel and per tile of `TILE` = 64 inputs, QLoRA's block
  size (blocks along the contracted axis, so a few large weights spoil only their own block).
  An input size that 64 does not divide (tiny test models) takes a tile of gcd(in, 64).
Scales are float32 (QLoRA's absmax constants are too, before its double quantization): 4 bytes
per 64 weights, 1/16 byte per weight, and no scale rounding to add to the 4-bit error.

Why a small module rather than qwix's NNX PTQ path (`quantize_model` + `PtqProvider`): PTQ
intercepts `dot_general` inside `nnx.Linear` and stores the QArray pieces boxed in the kernel's
own variable type, `nnx.Param`. Here the pieces must not be `nnx.Param` (they never train, get
no optimizer state and are never checkpointed: `LisenDiff.trainable_filter` and the train
step's split select by type), loading fills them tensor by tensor as the checkpoint is read,
and LoRA wraps and merges them; a module that owns two `QuantizedWeight` variables (the
QArray's qvalue and scale) and calls qwix in `__call__` does all three with no interception.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import qwix
from flax import nnx

from lisendiff_jax.backbone.layout import QUANTIZATIONS
from lisendiff_jax.backbone.model import projection_slots

# qwix's names for the storage types.
_QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}
TILE = 64


class QuantizedWeight(nnx.Variable):
    """A quantized projection's qvalue or scale: frozen backbone state, not a parameter (never
    trained, never in the optimizer state, never checkpointed; restore quantizes again)."""


def _check(quantization: str) -> None:
    if quantization not in _QTYPES:
        raise ValueError(
            f"unknown base quantization {quantization!r}; one of {', '.join(QUANTIZATIONS)}"
        )


def tile_size(quantization: str, in_features: int) -> int | None:
    """The input-axis block of one scale: None (the whole axis) for int8."""
    _check(quantization)
    return None if quantization == "int8" else math.gcd(in_features, TILE)


def _quantize(kernel: jax.Array, quantization: str) -> qwix.QArray:
    tile = tile_size(quantization, kernel.shape[0])
    return qwix.quantize(
        kernel.astype(jnp.float32),
        _QTYPES[quantization],
        channelwise_axes=(1,),
        tiled_axes={0: tile} if tile else None,
    )


@functools.cache
def _quantizer(quantization: str, shardings: tuple | None) -> Callable[[jax.Array], qwix.QArray]:
    """One jitted quantizer per setting and placement (compiled once per kernel shape)."""
    out = None
    if shardings is not None:
        out = qwix.QArray(shardings[0], shardings[1], None, _QTYPES[quantization])
    return jax.jit(functools.partial(_quantize, quantization=quantization), out_shardings=out)


def quantize_kernel(
    kernel: jax.Array,  # [in, out] float
    quantization: str,
    shardings: tuple[jax.sharding.Sharding, jax.sharding.Sharding] | None = None,
) -> qwix.QArray:
    """qwix's QArray of `kernel` (qvalue [in, out], scale [in // tile or 1, out] float32),
    placed by `shardings` (qvalue's, scale's) when given: computed where the kernel's shards
    are, so a sharded kernel is never gathered on one device."""
    chex.assert_rank(kernel, 2)
    return _quantizer(quantization, shardings)(kernel)


class QuantizedLinear(nnx.Module):
    """A frozen projection `x @ dequantize(W) + b` with W held by qwix pieces; takes the place
    of an `nnx.Linear` (same `in_features`, `out_features`, `dtype`, `param_dtype`, `bias`)."""

    def __init__(
        self,
        qarray: qwix.QArray,
        quantization: str,
        bias: jax.Array | None,
        *,
        dtype: jnp.dtype | None,
        param_dtype: jnp.dtype,
    ):
        _check(quantization)
        self.in_features, self.out_features = qarray.shape
        self.quantization = quantization
        self.dtype, self.param_dtype = dtype, jnp.dtype(param_dtype)
        self.qvalue = QuantizedWeight(qarray.qvalue)  # [in, out] int8 / int4 / uint4 (nf4)
        self.scale = QuantizedWeight(qarray.scale)  # [in // tile or 1, out] float32
        self.bias = nnx.Param(bias) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nnx.Linear, quantization: str) -> QuantizedLinear:
        bias = linear.bias[...] if linear.bias is not None else None
        return cls(
            quantize_kernel(linear.kernel[...], quantization),
            quantization,
            bias,
            dtype=linear.dtype,
            param_dtype=linear.param_dtype,
        )

    def qarray(self) -> qwix.QArray:
        return qwix.QArray(self.qvalue[...], self.scale[...], None, _QTYPES[self.quantization])

    def float_kernel(self) -> jax.Array:
        """W de-quantized by qwix, [in, out] float32."""
        return qwix.dequantize(self.qarray())

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        chex.assert_axis_dimension(x, -1, self.in_features)
        dtype = self.dtype or x.dtype
        # De-quantized in float32 and rounded once to the compute dtype, then one matmul in
        # that dtype. (qwix.dot_general would de-quantize too, its activations being float,
        # but multiply a bf16 input by the float32 weight, in float32.)
        kernel = self.float_kernel().astype(dtype)
        y = jax.lax.dot_general(x.astype(dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y

    def to_linear(self, kernel: jax.Array | None = None) -> nnx.Linear:
        """A plain `nnx.Linear` holding `kernel` (default: W de-quantized), in `param_dtype`."""
        linear = nnx.eval_shape(
            lambda: nnx.Linear(
                self.in_features,
                self.out_features,
                use_bias=self.bias is not None,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                rngs=nnx.Rngs(0),
            )
        )
        kernel = self.float_kernel() if kernel is None else kernel
        linear.kernel.set_value(kernel.astype(self.param_dtype))
        if self.bias is not None:
            linear.bias.set_value(self.bias[...])
        return linear


def is_quantized(decoder: nnx.Module) -> bool:
    """Whether the decoder holds a `QuantizedLinear` (bare, or as a LoRA adapter's base)."""
    return any(isinstance(module, QuantizedLinear) for _, module in nnx.iter_modules(decoder))


def quantize_projections(decoder: nnx.Module, quantization: str) -> nnx.Module:
    """Replaces every decoder layer's projection `nnx.Linear` by a `QuantizedLinear`, in place;
    returns `decoder`. "none" leaves it as it is."""
    if quantization == "none":
        return decoder
    for layer in decoder.layers:
        quantize_layer(layer, quantization)
    return decoder


def quantize_layer(layer: nnx.Module, quantization: str) -> nnx.Module:
    """`quantize_projections` of one decoder layer, in place; returns `layer`."""
    for block, name in projection_slots(layer):
        linear = getattr(block, name)
        if isinstance(linear, nnx.Linear):
            setattr(block, name, QuantizedLinear.from_linear(linear, quantization))
    return layer


def dequantize_projections(decoder: nnx.Module) -> nnx.Module:
    """Puts a float `nnx.Linear` (W de-quantized, in `param_dtype`) in place of every
    `QuantizedLinear` of the decoder layers, in place; returns `decoder`."""
    for layer in decoder.layers:
        for block, name in projection_slots(layer):
            projection = getattr(block, name)
            if isinstance(projection, QuantizedLinear):
                setattr(block, name, projection.to_linear())
    return decoder


class QuantizedSlot:
    """Loading's target for one quantized projection's checkpoint kernel: quacks like the
    abstract kernel variable it replaces (`shape` [in, out], `dtype` the backbone's
    `param_dtype`), and quantizes the value it is given into the module's qvalue and scale."""

    def __init__(
        self,
        qvalue: nnx.Variable,
        scale: nnx.Variable,
        quantization: str,
        param_dtype: jnp.dtype,
    ):
        self.qvalue, self.scale, self.quantization = qvalue, scale, quantization
        self.shape, self.dtype = tuple(qvalue.shape), jnp.dtype(param_dtype)

    def set_value(
        self,
        kernel: jax.Array,  # [in, out] in param_dtype
        sharding: Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None = None,
        path: str = "",  # the kernel's dotted path, e.g. "layers.0.mlp.up_proj.kernel"
    ) -> None:
        shardings = None
        if sharding is not None:
            prefix = path.rpartition(".")[0]
            shardings = (
                sharding(f"{prefix}.qvalue", self.qvalue.shape),
                sharding(f"{prefix}.scale", self.scale.shape),
            )
        q = quantize_kernel(kernel, self.quantization, shardings)
        self.qvalue.set_value(q.qvalue)
        self.scale.set_value(q.scale)


def quantized_targets(
    targets: dict[tuple, nnx.Variable], quantization: str, param_dtype: jnp.dtype
) -> dict[tuple, nnx.Variable | QuantizedSlot]:
    """Loading's {path: target} with each quantized projection's qvalue and scale replaced by
    one `QuantizedSlot` at its kernel's path, which the checkpoint names."""
    out = {}
    for path, variable in targets.items():
        if path[-1] == "scale" and path[:-1] + ("qvalue",) in targets:
            continue
        if path[-1] == "qvalue":
            scale = targets[path[:-1] + ("scale",)]
            out[path[:-1] + ("kernel",)] = QuantizedSlot(variable, scale, quantization, param_dtype)
        else:
            out[path] = variable
    return out
