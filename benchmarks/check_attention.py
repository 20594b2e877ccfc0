"""cuDNN flash attention (`model.attention=cudnn`, what "auto" picks on an NVIDIA GPU in bf16)
against the einsum reference, on a GPU.

A random 34M-shaped Llama in bf16 and a left-padded batch: the logits at real positions and the
gradients of a token loss with respect to every weight (the backward pass through attention) of
each kernel are compared with the same model computed in float32 (einsum). bf16 alone puts the
einsum kernel some way off that reference, so cuDNN passes when its largest relative error of a
tensor is at most `--slack` times the einsum kernel's (plus 1e-3). Then forward + backward of
both kernels, timed in turns, and one of "auto" on an odd length (which cuDNN refuses to
differentiate, so "auto" must take einsum there). Exits 1 when cuDNN is less accurate.

    python benchmarks/check_attention.py            # part of benchmarks/gpu_check.sh
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lisendiff_jax.backbone import BackboneConfig
from lisendiff_jax.backbone.model import Decoder, attention_kernel
from lisendiff_jax.backbone.presets import LLAMA_34M


def loss_and_grads(model: Decoder, ids: jax.Array, mask: jax.Array):
    """Mean next-token NLL over real positions, and its gradients (float32) by weight."""

    def loss(model):
        logits = model(ids[:, :-1], mask[:, :-1])
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
        weights = mask[:, 1:].astype(jnp.float32)
        return jnp.sum((logz - picked) * weights) / jnp.sum(weights)

    value, grads = nnx.value_and_grad(loss)(model)
    return value, jax.tree.map(lambda g: g.astype(jnp.float32), nnx.to_pure_dict(grads))


def worst(a, b) -> float:
    """The largest relative difference |x - y| / |x| (Euclidean norms) of two trees' tensors."""
    out = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        out = max(out, float(np.linalg.norm(x - y)) / max(float(np.linalg.norm(x)), 1e-30))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--slack", type=float, default=2.0)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"jax {jax.__version__} on {device.platform} ({device.device_kind})")

    bc = BackboneConfig.from_hf_dict(LLAMA_34M)
    model = Decoder(bc, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    rng = np.random.RandomState(0)
    # seq + 1 tokens: the model reads the first seq, the loss predicts the last seq.
    ids = rng.randint(0, bc.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    mask = np.ones_like(ids)
    for row in range(args.batch):  # left padding of 0, 1/4, 2/4, ... of the row
        mask[row, : row * args.seq // (2 * args.batch)] = 0
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    float32 = Decoder(bc, rngs=nnx.Rngs(0))
    float32.attention = "einsum"
    nnx.update(float32, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(model)))
    step = nnx.jit(loss_and_grads)
    logits_fn = nnx.jit(lambda m, i, a: m(i, a))
    real = np.asarray(mask, bool)

    def run(model):
        return (np.asarray(logits_fn(model, ids, mask))[real], *step(model, ids, mask))

    ref_logits, ref_loss, ref_grads = run(float32)
    errors = {}
    for kernel in ("einsum", "cudnn"):
        model.attention = kernel
        logits, loss, grads = run(model)
        errors[kernel] = (worst(ref_logits, logits), worst(ref_grads, grads))
        print(
            f"{kernel:>6} bf16 vs float32, batch {args.batch} x seq {args.seq}, left-padded: "
            f"loss {float(loss):.5f} vs {float(ref_loss):.5f}; largest relative error "
            f"|bf16 - float32| / |float32| of a tensor: logits {errors[kernel][0]:.2e}, "
            f"gradients {errors[kernel][1]:.2e}"
        )

    times = {kernel: [] for kernel in errors}
    for _ in range(args.steps):
        for kernel in times:
            model.attention = kernel
            start = time.perf_counter()
            jax.block_until_ready(step(model, ids, mask))
            times[kernel].append(time.perf_counter() - start)
    ms = {kernel: 1e3 * statistics.median(t) for kernel, t in times.items()}
    print(
        f"forward + backward, median of {args.steps} in turns: einsum {ms['einsum']:.1f} ms, "
        f"cudnn {ms['cudnn']:.1f} ms ({ms['einsum'] / ms['cudnn']:.2f}x)"
    )
    model.attention = "auto"
    odd = args.seq - 1 if args.seq % 2 == 0 else args.seq
    kernel = attention_kernel("auto", jnp.bfloat16, odd)
    loss, _ = step(model, ids[:, : odd + 1], mask[:, : odd + 1])
    print(f"auto, odd length {odd}: {kernel}, forward + backward ran, loss {float(loss):.5f}")
    pairs = zip(errors["cudnn"], errors["einsum"], strict=True)
    if any(c > args.slack * e + 1e-3 for c, e in pairs):
        print(f"FAILED: cudnn attention is more than {args.slack}x the einsum kernel's error")
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
