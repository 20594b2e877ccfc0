"""Memory arithmetic of a paper run on one GPU, from the model's exact parameter shapes.

Builds the LisenDiff model abstractly (shapes only, nothing allocated) for Llama-3.1-8B or
Qwen2-7B and adds up what training holds: frozen weights, trainable parameters, their
gradients, and the optimizer's state as the training optimizer initialises it (Adam moments,
and with --low-precision-update float32_master the float32 copies of the bf16 LM head).
A last table gives the same at the paper's settings with the frozen projections stored
quantized (model.base_quantization int8 / int4 / nf4): qwix's qvalue (4-bit values at half a
byte, packed as on GPU) plus its float32 scales. Activations are not included.

`--compiled` instead asks XLA: it lowers and compiles the real jitted train step
(train/step.py) of the paper config, remat as configured, on abstract inputs (nothing is
allocated) for a batch of `--batch` x max_length (512) tokens, and prints its
`memory_analysis()` for a float, int8 and nf4 base, with the LM head trained (the paper) and
frozen (`model.train_lm_head=False`): arguments (weights, training state, batch), outputs, the
part of the outputs written over donated arguments, temporaries (activations and XLA's
workspace), and peak = arguments + outputs - aliased + temporaries. On a CPU these are
XLA:CPU's buffer sizes, which approximate a GPU's (other fusions and kernels), not equal them.
`--target h200` compiles for that GPU instead, on any machine where jax's CUDA plugin is
installed (`pip install 'jax[cuda13]'`; no GPU needed, see gpu_targets/): XLA:GPU's own
buffers, with cuDNN's attention as "auto" takes it there. `--remat` compiles each policy given.
`--hlo DIR` writes each compiled step's optimised HLO there, one file a row of the table: its
fusions are the kernels a GPU profile names (`profile_step.py`), with the operations they
hold, so a kernel the profile shows can be looked up in it.

    python benchmarks/memory_budget.py [--backbone llama|qwen] [--inner-dim 1024 ...]
        [--low-precision-update stochastic|nearest|float32_master]
        [--compiled [BASE ...] [--batch 1] [--remat POLICY ...] [--target h200] [--hlo DIR]]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lisendiff_jax.backbone import BackboneConfig
from lisendiff_jax.backbone.layout import QUANTIZATIONS
from lisendiff_jax.backbone.model import REMAT_POLICIES, Decoder
from lisendiff_jax.backbone.presets import LLAMA_3_1_8B, QWEN2_7B
from lisendiff_jax.backbone.quantized import quantize_projections
from lisendiff_jax.config import LOW_PRECISION_UPDATES, paper_config
from lisendiff_jax.method.model import LatentStat, LisenDiff, split_for_training, training_loss
from lisendiff_jax.train.rounding import MasterState
from lisendiff_jax.train.step import make_optimizer, make_train_step

BACKBONES = {"llama": LLAMA_3_1_8B, "qwen": QWEN2_7B}
GIB = 2**30


def abstract_model(
    backbone: str,
    inner_dim: int,
    lisendiff: bool = True,
    update: str = "",
    latent_dim: int = 768,
    quantization: str = "none",
    train_lm_head: bool = True,
):
    config = paper_config(backbone, "ja", lisendiff)
    config.model.cross_attention.inner_dim = inner_dim
    config.model.train_lm_head = train_lm_head
    config.model.low_precision_update = update or config.model.low_precision_update
    bc = BackboneConfig.from_hf_dict(BACKBONES[backbone])
    m = config.model

    def build():
        decoder = Decoder(
            bc,
            dtype=jnp.dtype(m.compute_dtype),
            param_dtype=jnp.dtype(m.param_dtype),
            rngs=nnx.Rngs(0),
        )
        return LisenDiff(
            quantize_projections(decoder, quantization), m, latent_dim, rngs=nnx.Rngs(0)
        )

    return config, nnx.eval_shape(build)


def _bits(dtype) -> int:
    dtype = jnp.dtype(dtype)
    # int4 / uint4 (qwix's 4-bit values) take a byte each in NumPy, half a byte on the device.
    return jnp.iinfo(dtype).bits if jnp.issubdtype(dtype, jnp.integer) else 8 * dtype.itemsize


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * _bits(x.dtype) // 8 for x in jax.tree.leaves(tree))


def budget(
    backbone: str,
    inner_dim: int,
    lisendiff: bool = True,
    update: str = "",
    quantization: str = "none",
    train_lm_head: bool = True,
) -> dict[str, float]:
    config, model = abstract_model(
        backbone,
        inner_dim,
        lisendiff,
        update,
        quantization=quantization,
        train_lm_head=train_lm_head,
    )
    _, trainable, _, _, rest = nnx.split(
        model, model.trainable_filter(), LatentStat, nnx.RngState, ...
    )
    params = nbytes(trainable)
    opt_state = jax.eval_shape(make_optimizer(config, 1).init, trainable)
    master = nbytes(opt_state.master) if isinstance(opt_state, MasterState) else 0
    return {
        "frozen weights": nbytes(rest) / GIB,
        "trainable params": params / GIB,
        "gradients": params / GIB,
        "Adam": (nbytes(opt_state) - master) / GIB,
        "float32 master": master / GIB,
        "trainable count (M)": sum(x.size for x in jax.tree.leaves(trainable)) / 1e6,
    }


GPU_TARGETS = Path(__file__).resolve().parent / "gpu_targets"


def target_mesh(name: str) -> jax.sharding.Mesh:
    """A one-device mesh of the GPU `name`, described in gpu_targets/NAME.txtpb, that jax
    compiles for without the GPU being here (it needs jax's CUDA plugin, not a GPU)."""
    from jax.experimental import topologies

    description = (GPU_TARGETS / f"{name}.txtpb").read_text()
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", target_config=description, topology="1x1x1"
        )
    except Exception as e:  # whatever stops jax from compiling for CUDA here
        raise SystemExit(
            f"--target {name}: jax cannot compile for a CUDA GPU here ({str(e).splitlines()[0]}); "
            "install its CUDA plugin (pip install 'jax[cuda13]') and, on a machine without a "
            "GPU driver, set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1"
        ) from None
    return topologies.make_mesh(topology, (1,), ("data",))


def compiled_memory(
    backbone: str,
    quantization: str,
    train_lm_head: bool,
    batch_size: int = 1,
    remat: str = "",
    target: jax.sharding.Mesh | None = None,
    hlo: Path | None = None,
) -> dict[str, float]:
    """GiB of XLA's memory analysis of the paper run's jitted train step (see the module's
    docstring), rematerialised as `remat` says (default: as configured), compiled for
    abstract inputs on this machine's default device or, given a `target` mesh, for its GPU
    (with cuDNN's attention, which "auto" takes on an NVIDIA GPU); "compile s" is how long
    compiling took. Given `hlo`, the compiled program's HLO text is written to that file."""
    from bench_train_step import synthetic_batch  # a training batch's arrays (this folder)

    inner_dim = paper_config(backbone, "ja").model.cross_attention.inner_dim
    config, model = abstract_model(
        backbone, inner_dim, quantization=quantization, train_lm_head=train_lm_head
    )
    m = config.model
    m.remat = remat or m.remat
    # "auto" would ask a probe run on the GPU, which a target compiled for is not.
    m.attention = "cudnn" if target is not None else m.attention
    model.backbone.remat, model.backbone.attention = m.remat, m.attention  # as the Trainer
    graphdef, trainable, frozen = split_for_training(model)
    tx = make_optimizer(config, 1)
    on_target = None if target is None else (NamedSharding(target, PartitionSpec()),) * 5
    step = make_train_step(
        tx, functools.partial(training_loss, graphdef), on_target, m.low_precision_update
    )
    vocab = BACKBONES[backbone]["vocab_size"]
    batch = synthetic_batch(batch_size, config.data.max_length, vocab)
    abstract = (
        trainable,
        frozen,
        jax.eval_shape(tx.init, trainable),
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()},
        jax.eval_shape(lambda: jax.random.key(0)),
    )
    start = time.perf_counter()
    with contextlib.nullcontext() if target is None else jax.set_mesh(target):
        compiled = step.lower(*abstract).compile()
    seconds = time.perf_counter() - start
    if hlo is not None:
        hlo.write_text(compiled.as_text())
    analysis = compiled.memory_analysis()
    sizes = {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
    }
    peak = sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
    return {**{k: v / GIB for k, v in sizes.items()}, "peak": peak / GIB, "compile s": seconds}


def print_compiled(
    backbone: str,
    batch_size: int,
    quantizations: list[str],
    remats: list[str],
    target: str | None = None,
    hlo_dir: Path | None = None,
) -> None:
    mesh = None if target is None else target_mesh(target)
    device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
    print(
        f"{backbone}, paper settings, batch {batch_size} x 512: XLA's memory analysis of the "
        f"train step compiled for {device.device_kind} ({device.platform}; GiB)"
    )
    names = ("arguments", "outputs", "aliased", "temporaries", "peak")
    print(
        f"{'remat':>9} {'base':>5} {'lm_head':>7} "
        + " ".join(f"{n:>11}" for n in names)
        + "  compile"
    )
    for remat in remats:
        for train_lm_head in (True, False):
            for quantization in quantizations:
                head = "trained" if train_lm_head else "frozen"
                hlo = None
                if hlo_dir is not None:
                    hlo = hlo_dir / f"{backbone}_{remat}_{quantization}_head_{head}.hlo.txt"
                r = compiled_memory(
                    backbone, quantization, train_lm_head, batch_size, remat, mesh, hlo
                )
                print(
                    f"{remat:>9} {quantization:>5} {head:>7} "
                    + " ".join(f"{r[n]:11.2f}" for n in names)
                    + f"  {r['compile s']:.0f} s",
                    flush=True,
                )


# The trained parts, by a piece of their parameter path; the frozen weights are the rest.
PARTS = (
    ("LoRA", "lora_"),
    ("cross-attention", "cross_attn"),
    ("summary + denoisers", "summary|denoisers"),
    ("LM head", "lm_head"),
)


def by_part(backbone: str, inner_dim: int, update: str = "") -> list[tuple[str, float, float]]:
    """(part, million parameters, GiB of parameters + gradients + optimizer state) for each
    trained part, and the frozen weights (parameters only)."""
    config, model = abstract_model(backbone, inner_dim, update=update)
    _, trainable, _, _, rest = nnx.split(
        model, model.trainable_filter(), LatentStat, nnx.RngState, ...
    )
    opt_state = jax.eval_shape(make_optimizer(config, 1).init, trainable)

    def leaves(tree, pattern: str) -> list:
        return [
            leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
            if any(piece in jax.tree_util.keystr(path) for piece in pattern.split("|"))
        ]

    rows = []
    for name, pattern in PARTS:
        params = leaves(trainable, pattern)
        state = 2 * nbytes(params) + nbytes(leaves(opt_state, pattern))
        rows.append((name, sum(x.size for x in params) / 1e6, state / GIB))
    frozen = jax.tree.leaves(rest)
    rows.append(("frozen weights", sum(x.size for x in frozen) / 1e6, nbytes(frozen) / GIB))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="llama")
    parser.add_argument("--inner-dim", type=int, nargs="+", default=[0, 2048, 1024, 512])
    parser.add_argument(
        "--low-precision-update",
        choices=LOW_PRECISION_UPDATES,
        default=paper_config("llama", "ja").model.low_precision_update,
        help="how updates land on the bf16 lm_head (model.low_precision_update; default: the "
        "paper configs')",
    )
    parser.add_argument(
        "--compiled",
        nargs="*",
        choices=QUANTIZATIONS,
        metavar="BASE",
        help="only XLA's memory analysis of the compiled train step, for these bases (default: "
        "none int8 nf4; minutes per compile on a CPU)",
    )
    parser.add_argument("--batch", type=int, default=1, help="rows of 512 tokens (--compiled)")
    parser.add_argument(
        "--remat",
        nargs="+",
        choices=REMAT_POLICIES,
        help="rematerialisation policies to compile (--compiled; default: the config's)",
    )
    parser.add_argument(
        "--target",
        choices=sorted(p.stem for p in GPU_TARGETS.glob("*.txtpb")),
        help="compile for this GPU (gpu_targets/NAME.txtpb) instead of this machine's default "
        "device (--compiled; needs jax's CUDA plugin, not the GPU)",
    )
    parser.add_argument(
        "--hlo",
        type=Path,
        metavar="DIR",
        help="write each compiled step's optimised HLO text into DIR (--compiled)",
    )
    args = parser.parse_args()
    if args.compiled is not None:
        if args.hlo is not None and not args.hlo.is_dir():
            parser.error(f"--hlo {args.hlo}: not a directory")
        remats = args.remat or [paper_config(args.backbone, "ja").model.remat]
        bases = args.compiled or ["none", "int8", "nf4"]
        print_compiled(args.backbone, args.batch, bases, remats, args.target, args.hlo)
        return
    if args.remat or args.target or args.hlo:
        parser.error("--remat, --target and --hlo go with --compiled")
    update = args.low_precision_update
    mu = paper_config(args.backbone, "ja").optimizer_state_dtype
    print(
        f"{args.backbone}: bf16 frozen weights, fp32 LoRA and LisenDiff modules, "
        f"lm_head trained in bf16 ({update} updates), Adam mu {mu}, nu in each parameter's dtype"
    )
    header = f"{'inner_dim':>9} {'frozen':>7} {'train':>6} {'grads':>6} {'adam':>6} {'master':>6}"
    print(header + f" {'total':>6}  GiB   trainable")
    rows = [("lora_only", budget(args.backbone, 0, lisendiff=False, update=update))]
    rows += [(str(d or "hidden"), budget(args.backbone, d, update=update)) for d in args.inner_dim]
    for name, b in rows:
        parts = ("frozen weights", "trainable params", "gradients", "Adam", "float32 master")
        total = sum(b[part] for part in parts)
        print(
            f"{name:>9} {b['frozen weights']:7.2f} {b['trainable params']:6.2f} "
            f"{b['gradients']:6.2f} {b['Adam']:6.2f} {b['float32 master']:6.2f} {total:6.2f}"
            f"       {b['trainable count (M)']:.0f}M"
        )
    for inner_dim in (0, paper_config(args.backbone, "ja").model.cross_attention.inner_dim):
        print(f"\nby part at inner_dim {inner_dim or 'hidden'} (trained: with gradients and state)")
        for name, millions, gib in by_part(args.backbone, inner_dim, update):
            print(f"{name:>20} {millions:9.1f}M {gib:6.2f} GiB")
    paper_inner = paper_config(args.backbone, "ja").model.cross_attention.inner_dim
    print(
        f"\nquantized base at inner_dim {paper_inner} (weights and training state, no activations)"
    )
    print(f"{'base':>9} {'LM head':>8} {'frozen':>7} {'trained+grads+adam':>19} {'total':>6}  GiB")
    for quantization in QUANTIZATIONS:
        for train_lm_head in (True, False):
            b = budget(
                args.backbone,
                paper_inner,
                update=update,
                quantization=quantization,
                train_lm_head=train_lm_head,
            )
            trained = sum(
                b[part] for part in ("trainable params", "gradients", "Adam", "float32 master")
            )
            head = "trained" if train_lm_head else "frozen"
            print(
                f"{quantization:>9} {head:>8} {b['frozen weights']:7.2f} {trained:19.2f} "
                f"{b['frozen weights'] + trained:6.2f}"
            )


if __name__ == "__main__":
    main()
