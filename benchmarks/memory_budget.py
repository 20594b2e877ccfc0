"""Memory arithmetic of a paper run on one GPU, from the model's exact parameter shapes.

Builds the LisenDiff model abstractly (shapes only, nothing allocated) for Llama-3.1-8B or
Qwen2-7B and adds up what training holds: frozen weights, trainable parameters, their
gradients, and the optimizer's state as the training optimizer initialises it (Adam moments,
and with --low-precision-update float32_master the float32 copies of the bf16 LM head).

    python benchmarks/memory_budget.py [--backbone llama|qwen] [--inner-dim 1024 ...]
        [--low-precision-update stochastic|nearest|float32_master]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lisendiff_jax.backbone import BackboneConfig
from lisendiff_jax.backbone.model import Decoder
from lisendiff_jax.backbone.presets import LLAMA_3_1_8B, QWEN2_7B
from lisendiff_jax.config import LOW_PRECISION_UPDATES, paper_config
from lisendiff_jax.method.model import LatentStat, LisenDiff
from lisendiff_jax.train.rounding import MasterState
from lisendiff_jax.train.step import make_optimizer

BACKBONES = {"llama": LLAMA_3_1_8B, "qwen": QWEN2_7B}
GIB = 2**30


def abstract_model(
    backbone: str, inner_dim: int, lisendiff: bool = True, update: str = "", latent_dim: int = 768
):
    config = paper_config(backbone, "ja", lisendiff)
    config.model.cross_attention.inner_dim = inner_dim
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
        return LisenDiff(decoder, m, latent_dim, rngs=nnx.Rngs(0))

    return config, nnx.eval_shape(build)


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def budget(
    backbone: str, inner_dim: int, lisendiff: bool = True, update: str = ""
) -> dict[str, float]:
    config, model = abstract_model(backbone, inner_dim, lisendiff, update)
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
