"""Training-step throughput: our jitted step vs transformers + PEFT LoRA in PyTorch.

Both train the same random Llama (same shape, batch and sequence length) with LoRA rank 16 on
q_proj and v_proj, the LM head trained, AdamW, and the loss on the second half of each
sequence. "ours lora_only" is the like-for-like comparison (no LisenDiff modules);
"ours lisendiff" adds cross-attention, the summary and the denoisers, as the paper trains.

    python benchmarks/bench_train_step.py                       # ~34M model, fp32, this CPU
    python benchmarks/bench_train_step.py --size 8b --no-peft   # Llama-3.1-8B shape, bf16, GPU

On a GPU it also prints model FLOPs utilisation and peak memory, and whether that fits 24 GB.
Model FLOPs per token count the forward pass, the backward pass through the activations, and
the weight gradients of the trainable matmuls only (the frozen weights get none); recomputation
from rematerialisation is not counted.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lisendiff_jax.backbone import BackboneConfig
from lisendiff_jax.backbone.model import Decoder
from lisendiff_jax.backbone.presets import LLAMA_3_1_8B, LLAMA_34M, transformers_kwargs
from lisendiff_jax.config import paper_config
from lisendiff_jax.method.model import LisenDiff, split_for_training, training_loss
from lisendiff_jax.train.step import make_optimizer, make_train_step

SIZES = {"34m": LLAMA_34M, "8b": LLAMA_3_1_8B}
LATENT_DIM = 768
# Dense bf16 peak of the cards we are lent (H100 / H200 SXM), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, seq // 2 :] = 1
    return {
        "input_ids": rng.randint(0, vocab, (batch, seq)).astype(np.int32),
        "attention_mask": np.ones((batch, seq), np.int32),
        "loss_mask": loss_mask,
        "row_mask": np.ones((batch,), np.int32),
        "style_id": (np.arange(batch) % 2).astype(np.int32),
        "response_latent": rng.randn(batch, 1, LATENT_DIM).astype(np.float32),
        "context_embeddings": rng.randn(batch, 8, LATENT_DIM).astype(np.float32),
        "context_mask": np.ones((batch, 8), bool),
    }


def model_flops_per_token(bc: BackboneConfig, trainable_matmul_params: int, seq: int) -> float:
    """Forward + activation backward (2x forward) + trainable weight gradients."""
    matmul = bc.num_params - bc.vocab_size * bc.hidden_size - bc.hidden_size  # no embedding
    attention = 4 * bc.num_layers * seq * bc.num_heads * bc.head_dim  # QK^T and PV, per token
    forward = 2 * matmul + attention
    return 3 * forward + 2 * trainable_matmul_params


def run_ours(args, lisendiff: bool) -> dict:
    config = paper_config("bench", "ja", lisendiff)
    config.learning_rate = 1e-4
    m = config.model
    if args.size == "34m":
        m.param_dtype = m.compute_dtype = "float32"
        m.remat = "none"
        m.cross_attention.last_n_layers = 4
        m.cross_attention.inner_dim = 256
    bc = BackboneConfig.from_hf_dict(SIZES[args.size])

    @nnx.jit
    def build():
        decoder = Decoder(
            bc,
            dtype=jnp.dtype(m.compute_dtype),
            param_dtype=jnp.dtype(m.param_dtype),
            rngs=nnx.Rngs(0),
        )
        return LisenDiff(decoder, m, LATENT_DIM, rngs=nnx.Rngs(params=1, dropout=2))

    model = build()
    model.backbone.remat = m.remat
    graphdef, trainable, frozen = split_for_training(model)
    del model
    tx = make_optimizer(config, 1000)
    opt_state = tx.init(trainable)
    step = make_train_step(tx, functools.partial(training_loss, graphdef))
    batch = {
        k: jnp.asarray(v) for k, v in synthetic_batch(args.batch, args.seq, bc.vocab_size).items()
    }
    state = {"trainable": trainable, "opt": opt_state}

    def one_step(i: int) -> None:
        state["trainable"], state["opt"], metrics = step(
            state["trainable"], frozen, state["opt"], batch, jax.random.key(i)
        )
        jax.block_until_ready(metrics["loss"])

    start = time.perf_counter()
    one_step(0)
    compile_s = time.perf_counter() - start
    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        one_step(i + 1)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    trainable_matmul = sum(x.size for x in jax.tree.leaves(state["trainable"]) if x.ndim >= 2)
    result = {
        "tokens_per_s": args.batch * args.seq / seconds,
        "step_s": seconds,
        "compile_s": compile_s,
        "flops_per_token": model_flops_per_token(bc, trainable_matmul, args.seq),
        "trainable_M": sum(x.size for x in jax.tree.leaves(state["trainable"])) / 1e6,
    }
    stats_mem = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats_mem:
        result["peak_gib"] = stats_mem["peak_bytes_in_use"] / 2**30
    return result


def run_peft(args) -> dict:
    """transformers + PEFT: fp32 on the CPU; on a GPU bf16 weights with gradient checkpointing,
    the settings a user would pick to fit one card (as ours rematerialises)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = transformers_kwargs(SIZES[args.size])
    gpu = torch.cuda.is_available()
    if gpu:
        with torch.device("cuda"):
            model = LlamaForCausalLM._from_config(LlamaConfig(**cfg), dtype=torch.bfloat16)
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    else:
        model = LlamaForCausalLM(LlamaConfig(**cfg))
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["lm_head"],
    )
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    batch = synthetic_batch(args.batch, args.seq, cfg["vocab_size"])
    device = next(model.parameters()).device
    ids = torch.tensor(batch["input_ids"], dtype=torch.long, device=device)
    labels = ids.clone()
    labels[torch.tensor(batch["loss_mask"], device=device) == 0] = -100

    def one_step() -> None:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()

    one_step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    result = {"tokens_per_s": args.batch * args.seq / seconds, "step_s": seconds}
    if gpu:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="34m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-peft", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument(
        "--variants",
        nargs="*",
        default=["lora_only", "lisendiff"],
        choices=["lora_only", "lisendiff"],
    )
    args = parser.parse_args()

    device = jax.devices()[0]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores; jax {jax.__version__} "
        f"on {device.platform} ({device.device_kind})"
    )
    print(
        f"model: random Llama, size {args.size}; batch {args.batch} x seq {args.seq}; "
        f"median of {args.steps} steps after one warm-up"
    )
    results = {}
    for variant in args.variants:
        results[variant] = run_ours(args, lisendiff=variant == "lisendiff")
    if not args.no_peft:
        results["peft"] = run_peft(args)
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in device.device_kind), None)
    for name, r in results.items():
        line = f"{name:>10}: {r['tokens_per_s']:9.1f} tok/s  step {r['step_s'] * 1e3:8.1f} ms"
        if "compile_s" in r:
            line += f"  compile {r['compile_s']:.1f} s  trainable {r['trainable_M']:.1f}M"
        if peak and "flops_per_token" in r:
            mfu = r["tokens_per_s"] * r["flops_per_token"] / (peak * 1e12)
            line += f"  MFU {100 * mfu:.1f}%"
        if "peak_gib" in r:
            fits = "fits" if r["peak_gib"] < 23.5 else "does NOT fit"
            line += f"  peak {r['peak_gib']:.2f} GiB ({fits} 24 GB)"
        print(line, flush=True)
    if "peft" in results:
        for variant in args.variants:  # when run together (on a GPU, run them apart for memory)
            ratio = results[variant]["tokens_per_s"] / results["peft"]["tokens_per_s"]
            print(f"ratio ours {variant} / transformers+PEFT: {ratio:.2f}")


if __name__ == "__main__":
    main()
