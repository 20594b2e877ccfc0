"""The trained LM head's optimizer update alone: ours vs torch.optim.AdamW, side by side.

With the paper's settings the bf16 LM head is by far the largest trained tensor (525M values
on the 8B shape, against 6.8M of LoRA), and its update is one pass over the head, its gradient
and Adam's two moments. Ours is the training step's update (`train.step.optimizer_update`, the
paper config's AdamW with bf16 moments) in each `model.low_precision_update`:

    stochastic       the head and both moments stochastically rounded (the default)
    nearest          rounded to nearest (no random bits): the floor of the update's cost
    float32_master   a float32 copy of the head updated, the head rounded from it

against `torch.optim.AdamW` on the same bf16 head (fused where the build supports it), which
keeps its moments in bf16 and rounds to nearest: what transformers + PEFT run.

    python benchmarks/bench_head_update.py                    # the 34M model's head, CPU
    python benchmarks/bench_head_update.py --size 8b          # 4096 x 128256, GPU
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from lisendiff_jax.backbone import BackboneConfig
from lisendiff_jax.config import paper_config
from lisendiff_jax.train.step import make_optimizer, optimizer_update

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_step import SIZES, first_and_median  # noqa: E402

MODES = ("stochastic", "nearest", "float32_master")


def make_ours(shape: tuple[int, int], mode: str) -> Callable[[int], None]:
    """`one_update(i)`: our jitted update of a bf16 head of `shape` (in place), waited; its
    rounding key comes from the optimizer state's step count, as in training."""
    config = paper_config("bench", "ja", lisendiff=False)
    config.learning_rate = 1e-4
    config.model.low_precision_update = mode
    tx = make_optimizer(config, 1000)
    head = {"lm_head": jax.random.normal(jax.random.key(0), shape, jnp.bfloat16) * 0.02}
    grads = {"lm_head": jax.random.normal(jax.random.key(1), shape, jnp.bfloat16) * 1e-3}
    state = {"head": head, "opt": tx.init(head)}
    update = jax.jit(
        functools.partial(optimizer_update, tx, low_precision_update=mode), donate_argnums=(1, 2)
    )

    def one_update(_: int) -> None:
        state["head"], state["opt"] = update(grads, state["opt"], state["head"])
        jax.block_until_ready(state["head"])

    return one_update


def make_torch(shape: tuple[int, int]) -> tuple[Callable[[int], None], str]:
    """torch's `one_update(i)` on the same bf16 head, and which AdamW ran."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    head = torch.nn.Parameter(torch.randn(shape, dtype=torch.bfloat16, device=device) * 0.02)
    head.grad = torch.randn(shape, dtype=torch.bfloat16, device=device) * 1e-3
    try:
        optimizer, kind = torch.optim.AdamW([head], lr=1e-4, fused=True), "fused"
    except RuntimeError:  # a build or device without the fused kernel
        optimizer, kind = torch.optim.AdamW([head], lr=1e-4), "foreach"

    def one_update(i: int) -> None:
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return one_update, kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="34m")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=10, help="updates timed (median)")
    parser.add_argument("--no-torch", action="store_true", help="skip torch.optim.AdamW")
    args = parser.parse_args()

    bc = BackboneConfig.from_hf_dict(SIZES[args.size])
    shape = (bc.hidden_size, bc.vocab_size)  # the kernel's [in, out]
    device = jax.devices()[0]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores; jax {jax.__version__} on "
        f"{device.platform} ({device.device_kind})"
    )
    print(
        f"bf16 LM head {shape[0]} x {shape[1]} ({shape[0] * shape[1] / 1e6:.0f}M values), "
        f"AdamW; median of {args.steps} updates after one warm-up, each waited for"
    )
    times = {}
    for mode in args.modes:
        _, times[f"ours {mode}"] = first_and_median(make_ours(shape, mode), args.steps)
    if not args.no_torch:
        one_update, kind = make_torch(shape)
        _, times[f"torch AdamW ({kind})"] = first_and_median(one_update, args.steps)
    values = shape[0] * shape[1]
    for name, seconds in times.items():
        print(
            f"{name:>24}: {seconds * 1e3:8.2f} ms/update  {values / seconds / 1e9:6.2f} G values/s"
        )
    if "ours stochastic" in times:  # speed, as the other benchmarks: above 1, ours is faster
        for name, seconds in times.items():
            if name != "ours stochastic":
                print(f"ratio ours stochastic / {name}: {seconds / times['ours stochastic']:.2f}")


if __name__ == "__main__":
    main()
