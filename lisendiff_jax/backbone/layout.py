"""The backbone's named parts, and the logical names of their dimensions.

`PROJECTIONS` is the one table of a decoder layer's projections: the block that holds each one
and the logical name of its input and output dimension. LoRA targets, config validation and the
sharding rules all read it. Logical names ("embed", "heads", "mlp", ...) only name dimensions;
the application decides where they live (`lisendiff_jax.sharding` maps them to mesh axes and
installs `activation_constraint` while a mesh is active), so the backbone knows nothing of
meshes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax

Logical = tuple[str | None, ...]


class Projection(NamedTuple):
    block: str  # the decoder layer's submodule that holds it
    d_in: str  # logical name of the input dimension
    d_out: str  # ... and of the output dimension


PROJECTIONS: dict[str, Projection] = {
    "q_proj": Projection("self_attn", "embed", "heads"),
    "k_proj": Projection("self_attn", "embed", "heads"),
    "v_proj": Projection("self_attn", "embed", "heads"),
    "o_proj": Projection("self_attn", "heads", "embed"),
    "gate_proj": Projection("mlp", "embed", "mlp"),
    "up_proj": Projection("mlp", "embed", "mlp"),
    "down_proj": Projection("mlp", "mlp", "embed"),
}

# How the frozen projections may be stored (`model.base_quantization`; backbone/quantized.py).
QUANTIZATIONS = ("none", "int8", "int4", "nf4")

_constraint: Callable[[jax.Array, Logical], jax.Array] | None = None


def constrain(x: jax.Array, logical: Logical) -> jax.Array:
    """`x` passed through the installed constraint for these logical names; unchanged when none
    is installed (one device), so model code can call it unconditionally."""
    return x if _constraint is None else _constraint(x, logical)


@contextlib.contextmanager
def activation_constraint(fn: Callable[[jax.Array, Logical], jax.Array]) -> Iterator[None]:
    """Makes `constrain` apply `fn` to activations traced inside the block."""
    global _constraint
    previous, _constraint = _constraint, fn
    try:
        yield
    finally:
        _constraint = previous
