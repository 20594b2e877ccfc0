"""Memory arithmetic of a paper run on one GPU, from the model's exact parameter shapes.

Builds the LisenDiff model abstractly (shapes only, nothing allocated) for Llama-3.1-8B or
Qwen2-7B and adds up what training holds: frozen weights, trainable parameters, their
gradients and Adam moments. With --compile it also compiles the training step for abstract
inputs and reports XLA's own figure for temporaries (activations, workspace) on this backend.

    python benchmarks/memory_budget.py [--backbone llama|qwen] [--inner-dim 1024] [--compile]
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
from lisendiff_jax.config import paper_config
from lisendiff_jax.method.model import LatentStat, LisenDiff

BACKBONES = {"llama": LLAMA_3_1_8B, "qwen": QWEN2_7B}
GIB = 2**30


def abstract_model(backbone: str, inner_dim: int, lisendiff: bool = True, latent_dim: int = 768):
    config = paper_config(backbone, "ja", lisendiff)
    config.model.cross_attention.inner_dim = inner_dim
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


def budget(backbone: str, inner_dim: int, lisendiff: bool = True) -> dict[str, float]:
    config, model = abstract_model(backbone, inner_dim, lisendiff)
    _, trainable, _, _, rest = nnx.split(
        model, model.trainable_filter(), LatentStat, nnx.RngState, ...
    )
    params = nbytes(trainable)
    mu_dtype = jnp.dtype(config.optimizer_state_dtype)
    mu = sum(int(np.prod(x.shape)) * mu_dtype.itemsize for x in jax.tree.leaves(trainable))
    return {
        "frozen weights": nbytes(rest) / GIB,
        "trainable params": params / GIB,
        "gradients": params / GIB,
        "Adam mu": mu / GIB,
        "Adam nu": params / GIB,
        "trainable count (M)": sum(x.size for x in jax.tree.leaves(trainable)) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="llama")
    parser.add_argument("--inner-dim", type=int, nargs="+", default=[0, 2048, 1024, 512])
    args = parser.parse_args()
    mu = paper_config(args.backbone, "ja").optimizer_state_dtype
    print(
        f"{args.backbone}: bf16 frozen weights, fp32 LoRA and LisenDiff modules, "
        f"lm_head trained in bf16, Adam mu {mu}, nu in each parameter's dtype"
    )
    header = f"{'inner_dim':>9} {'frozen':>7} {'train':>6} {'grads':>6} {'adam':>6} {'total':>6}"
    print(header + "  GiB   trainable")
    rows = [("lora_only", budget(args.backbone, 0, lisendiff=False))]
    rows += [(str(d or "hidden"), budget(args.backbone, d)) for d in args.inner_dim]
    for name, b in rows:
        adam = b["Adam mu"] + b["Adam nu"]
        total = b["frozen weights"] + b["trainable params"] + b["gradients"] + adam
        print(
            f"{name:>9} {b['frozen weights']:7.2f} {b['trainable params']:6.2f} "
            f"{b['gradients']:6.2f} {adam:6.2f} {total:6.2f}       "
            f"{b['trainable count (M)']:.0f}M"
        )


if __name__ == "__main__":
    main()
