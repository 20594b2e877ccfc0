"""Running on a device mesh: named axes, logical axis names, and the rules between them.

The mesh has three axes, `data` x `fsdp` x `tensor`. Arrays are never annotated with mesh axes
directly: every dimension gets a *logical* name ("embed", "heads", "batch", ...) from the
parameter's path (the backbone's `PROJECTIONS` table), and `rules` map logical names to mesh axes:

    batch -> (data, fsdp)   rows of a batch split over every data-parallel device
    embed -> fsdp           weights split along the model width (ZeRO-3 style)
    heads, mlp, vocab -> tensor   Megatron-style column/row splits

So one table decides where every parameter, every optimizer moment (whose tree path ends with
its parameter's) and every batch lives, and a config can move a logical axis to another mesh
axis without touching the model. A dimension that its mesh axes do not divide is replicated
instead (tiny models; a 128k vocabulary on 3 devices).

Multi-host: `initialize_distributed` starts `jax.distributed` from environment variables, each
process feeds the rows of a global batch that live on its own devices (`process_rows`), and
`global_array` assembles them into one global array without any host holding the others' rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from lisendiff_jax.backbone.layout import PROJECTIONS, Logical, activation_constraint
from lisendiff_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes. Names not listed (length, latent, lora, style, ...) replicate.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
}

# Tables and cross-attention projections whose input is not the model width.
SPECIAL: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embed_tokens\.embedding$", ("vocab", "embed")),
    (r"lm_head\.kernel$", ("embed", "vocab")),
    (r"cross_attn\.attn\.[kv]_proj\.kernel$", ("latent", "heads")),
)
# The style summary and the denoisers are small (a few M parameters) and run at every
# sampling step, where gathering their weights would cost more than keeping copies.
REPLICATED_MODULES = re.compile(r"(^|\.)(summary|denoisers)\.")
_PROJECTION_LEAF = re.compile(r"(?:^|\.)(" + "|".join(PROJECTIONS) + r")(?:\.base)?\.(\w+)$")


class MeshError(UserError, ValueError):
    """A mesh or sharding setting that cannot work here; the message names the option."""


def dotted_path(key_path: Sequence[Any]) -> str:
    """`backbone.layers.0.mlp.up_proj.kernel` for a jax key path (a trailing `.value`, which
    nnx.State adds, dropped)."""
    parts = []
    for key in key_path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    if parts and parts[-1] == "value":
        parts.pop()
    return ".".join(parts)


def logical_axes(path: str, ndim: int) -> Logical:
    """The logical name of each dimension of the array at `path` (None: replicated)."""
    axes: Logical | None = None
    if REPLICATED_MODULES.search(path):
        axes = None
    elif special := next((a for pattern, a in SPECIAL if re.search(pattern, path)), None):
        axes = special
    elif match := _PROJECTION_LEAF.search(path):
        # A kernel is [in, out], a bias [out]; a LoRA adapter is lora_a [in, rank] and
        # lora_b [rank, out]. A quantized kernel's qvalue is [in, out] and its scale
        # [in // tile or 1, out], split like the kernel where its size allows (`spec`).
        _, d_in, d_out = PROJECTIONS[match.group(1)]
        axes = {
            "kernel": (d_in, d_out),
            "qvalue": (d_in, d_out),
            "scale": (d_in, d_out),
            "bias": (d_out,),
            "lora_a": (d_in, "lora"),
            "lora_b": ("lora", d_out),
        }.get(match.group(2))
    if axes is None or len(axes) != ndim:
        return (None,) * ndim
    return axes


def parse_rules(overrides: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """DEFAULT_RULES with `"logical=axis[,axis]"` overrides (`"vocab="` replicates)."""
    rules = dict(DEFAULT_RULES)
    for item in overrides:
        name, sep, axes = item.partition("=")
        mesh_axes = tuple(a.strip() for a in axes.split(",") if a.strip())
        if not sep or not name.strip() or any(a not in MESH_AXES for a in mesh_axes):
            raise MeshError(
                f"--config.mesh.rules: {item!r} is not 'logical=axis[,axis]' with axes from "
                f"{', '.join(MESH_AXES)}"
            )
        rules[name.strip()] = mesh_axes
    return rules


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) from the `mesh` config section; one of them may be -1 (the rest)."""
    sizes = [config[axis] for axis in MESH_AXES]
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise MeshError(
            "--config.mesh: data, fsdp and tensor must be positive, one of them may be -1"
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(
                f"--config.mesh: {num_devices} devices do not split into the given axes "
                f"({' x '.join(map(str, sizes))})"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"--config.mesh: data x fsdp x tensor = {' x '.join(map(str, sizes))} = "
            f"{math.prod(sizes)}, but {num_devices} devices are visible"
        )
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """A mesh and the logical-to-mesh rules: where every array of a run lives."""

    mesh: Mesh
    rules: Mapping[str, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_RULES)
    )

    @classmethod
    def create(
        cls,
        shape: tuple[int, int, int] = (1, -1, 1),
        rules: Sequence[str] = (),
        devices: Sequence[jax.Device] | None = None,
    ) -> MeshPlan:
        """A (data, fsdp, tensor) mesh over `devices` (all of them by default)."""
        devices = list(jax.devices() if devices is None else devices)
        config = ml_collections.ConfigDict(dict(zip(MESH_AXES, shape, strict=True)))
        sizes = mesh_shape(config, len(devices))
        # Auto axes: XLA propagates shardings through the model from the annotated inputs,
        # parameters and constraints (jax.make_mesh would default to Explicit axes).
        mesh = jax.make_mesh(
            sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
        )
        return cls(mesh, parse_rules(rules))

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> MeshPlan:
        """The plan of a config's `mesh` section, over every device of every process."""
        m = config.mesh
        return cls.create((m.data, m.fsdp, m.tensor), tuple(m.rules))

    @property
    def batch_divisor(self) -> int:
        """A global batch's row count must be a multiple of this."""
        return math.prod(self.mesh.shape[a] for a in self.rules.get("batch", ()))

    def spec(self, logical: Logical, shape: Sequence[int]) -> PartitionSpec:
        """The PartitionSpec of an array `shape` whose dimensions have these logical names."""
        used: set[str] = set()
        dims = []
        for name, size in zip(logical, shape, strict=True):
            axes = tuple(a for a in self.rules.get(name, ()) if a not in used)
            if axes and size % math.prod(self.mesh.shape[a] for a in axes) == 0:
                used.update(axes)
                dims.append(axes[0] if len(axes) == 1 else axes)
            else:
                dims.append(None)
        return PartitionSpec(*dims)

    def sharding(self, logical: Logical, shape: Sequence[int]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def tree_shardings(self, tree: Any) -> Any:
        """A NamedSharding for every array of a parameter or optimizer-state tree, by path."""

        def leaf_sharding(key_path, leaf):
            shape = np.shape(leaf)
            return self.sharding(logical_axes(dotted_path(key_path), len(shape)), shape)

        return jax.tree_util.tree_map_with_path(leaf_sharding, tree)

    def batch_shardings(self, batch: Any) -> Any:
        """Every array of a batch split along its leading (row) dimension."""
        return jax.tree.map(
            lambda x: self.sharding(("batch",) + (None,) * (np.ndim(x) - 1), np.shape(x)), batch
        )

    def step_shardings(
        self, trainable: Any, frozen: Any, opt_state: Any, batch_size: int
    ) -> tuple[Any, Any, Any, NamedSharding, NamedSharding]:
        """`train_step.make_train_step`'s shardings: parameters and optimizer state by the
        rules, batch rows split, the RNG key replicated."""
        return (
            self.tree_shardings(trainable),
            self.tree_shardings(frozen),
            self.tree_shardings(opt_state),
            self.sharding(("batch",), (batch_size,)),  # a prefix for every array of a batch
            self.replicated,
        )

    def place(self, tree: Any, shardings: Any | None = None) -> Any:
        """`tree` moved onto the mesh (`tree_shardings` by default). Every process must pass
        the same values; each keeps only the pieces its own devices hold."""
        shardings = self.tree_shardings(tree) if shardings is None else shardings
        return jax.tree.map(_put, tree, shardings)

    def process_rows(self, num_rows: int) -> slice:
        """The rows of a global batch that this process's devices hold (a contiguous block)."""
        sharding = self.sharding(("batch",), (num_rows,))
        starts = sorted(
            {
                (index[0].start or 0, index[0].stop or num_rows)
                for index in sharding.addressable_devices_indices_map((num_rows,)).values()
            }
        )
        lo, hi = starts[0][0], starts[-1][1]
        if sum(stop - start for start, stop in starts) != hi - lo:
            raise MeshError(
                "--config.mesh: this process's devices do not hold a contiguous block of rows; "
                "put the data axes first in the device order"
            )
        return slice(lo, hi)

    def global_array(self, local: np.ndarray, num_rows: int) -> jax.Array:
        """One global batch array from this process's rows (`process_rows`) of it."""
        shape = (num_rows, *np.shape(local)[1:])
        sharding = self.sharding(("batch",) + (None,) * (len(shape) - 1), shape)
        return jax.make_array_from_process_local_data(sharding, np.asarray(local), shape)

    def active(self) -> contextlib.AbstractContextManager[None]:
        """Makes the backbone's `constrain` apply this plan's rules to activations traced
        inside."""
        return activation_constraint(
            lambda x, logical: jax.lax.with_sharding_constraint(x, self.sharding(logical, x.shape))
        )


def _put(value: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(value, jax.Array):
        if value.sharding.is_equivalent_to(sharding, value.ndim):
            # E.g. backbone weights loaded into their shards. A one-device array is given the
            # mesh's sharding all the same (no copy): a jitted step's outputs carry it, and
            # fed back in place of an input of another sharding type they would compile the
            # step a second time.
            return value if value.sharding == sharding else jax.device_put(value, sharding)
        if jax.process_count() == 1 or not value.is_fully_addressable:
            return jax.device_put(value, sharding)  # resharding a global array
    # A value this process holds whole (freshly initialised, or NumPy): each process cuts
    # out the pieces of its own devices.
    return _from_host_copy(value, sharding)


def _from_host_copy(value: Any, sharding: NamedSharding) -> jax.Array:
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):  # RNG keys: via their data
        data = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec))
        return jax.random.wrap_key_data(_from_host_copy(jax.random.key_data(value), data))
    host = np.asarray(jax.device_get(value))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_fn(plan: MeshPlan | None) -> Callable[[str, tuple[int, ...]], NamedSharding] | None:
    """For `load_backbone`: the sharding of the tensor at a parameter path; None on one
    device, where loading's own path (cast and transpose on the device) is faster."""
    if plan is None or plan.mesh.size == 1:
        return None
    return lambda path, shape: plan.sharding(logical_axes(path, len(shape)), shape)


DISTRIBUTED_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> bool:
    """Starts multi-process JAX when the environment asks for it; True if it did.

    Either all of JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID are set, or the job runs under a launcher JAX detects by itself (SLURM with
    more than one task, Open MPI). One process per host, each seeing its local devices.
    """
    given = [name for name in DISTRIBUTED_VARIABLES if environ.get(name)]
    if given:
        if len(given) != len(DISTRIBUTED_VARIABLES):
            missing = sorted(set(DISTRIBUTED_VARIABLES) - set(given))
            raise MeshError(f"environment: multi-host needs {', '.join(missing)} as well")
        try:
            num, pid = int(environ["JAX_NUM_PROCESSES"]), int(environ["JAX_PROCESS_ID"])
        except ValueError:
            raise MeshError(
                "environment: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers"
            ) from None
        if not 0 <= pid < num:
            raise MeshError(f"environment: JAX_PROCESS_ID={pid} is not in [0, {num})")
        # CPU devices of different processes talk through gloo (a CPU-only run, e.g. the
        # tests on one machine); GPU and TPU collectives are unaffected.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(environ["JAX_COORDINATOR_ADDRESS"], num, pid)
        return True
    launched = (
        int(environ.get("SLURM_NTASKS", "1")) > 1
        or int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if launched:
        jax.distributed.initialize()
    return launched
