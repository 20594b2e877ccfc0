"""Training-step throughput: our jitted step vs transformers + PEFT LoRA in PyTorch.

Both train the same random Llama (same shape, batch and sequence length) with LoRA rank 16 on
q_proj and v_proj, the LM head trained, AdamW, and the loss on the second half of each
sequence. "ours lora_only" is the like-for-like comparison (no LisenDiff modules);
"ours lisendiff" adds cross-attention, the summary and the denoisers, as the paper trains.

    python benchmarks/bench_train_step.py                       # ~34M model, fp32, CPU
    python benchmarks/bench_train_step.py --size 8b --no-peft   # Llama-3.1-8B shape, bf16, GPU

    python benchmarks/bench_train_step.py --mfu-from-log benchmarks/results_gpu_h200.log

    python benchmarks/bench_train_step.py --packing /data/esconv/esconv_dev.jsonl --steps 16

`--packing ESCONV_JSONL` instead trains the LisenDiff step on real dialogue, the bundled
samples plus that ESConv file (the JSONL dialogue format, docs/data.md) tokenised as the
embedded default does, and prints real (non-padding) tokens per second and the padding
fraction of bucketed batches (one example a row) and packed ones (`data.packing`), over the
same examples: the first `--steps` bucketed batches. `--max-length 512` tokenises and packs at
the paper configs' `data.max_length` instead of the embedded default's 256.

    python benchmarks/bench_train_step.py --base-quantization none int8 nf4   # float vs qwix

`--base-quantization` runs each variant once per storage of the frozen projections ("none":
float; int8, int4, nf4 as `model.base_quantization`), side by side, and prints each quantized
step's tokens/s as a ratio to the float one's. On a GPU it also prints model FLOPs utilisation
(MFU, see `train_flops`) and peak memory, and whether that fits a 24, 16 or 12 GB card.
`--mfu-from-log` recomputes FLOPs, MFU and the ratios to PEFT of the results in a saved log of
this script (from their tokens/s) without running anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lisendiff_jax.backbone import BackboneConfig
from lisendiff_jax.backbone.layout import QUANTIZATIONS
from lisendiff_jax.backbone.model import ATTENTION_KERNELS, REMAT_POLICIES, Decoder, DecoderLayer
from lisendiff_jax.backbone.presets import LLAMA_3_1_8B, LLAMA_34M, transformers_kwargs
from lisendiff_jax.backbone.quantized import quantize_layer
from lisendiff_jax.config import load_config, paper_config, source
from lisendiff_jax.data.batching import iterate_batches, length_buckets, packing_segments
from lisendiff_jax.data.formatting import encode_examples
from lisendiff_jax.method.model import LisenDiff, split_for_training, training_loss
from lisendiff_jax.tiny import backbone_folder
from lisendiff_jax.train.loop import data_mix, training_prompts
from lisendiff_jax.train.step import make_optimizer, make_train_step

SIZES = {"34m": LLAMA_34M, "8b": LLAMA_3_1_8B}
LATENT_DIM = 768
N_LATENTS = 1  # response latents per example
N_CONTEXT = 8  # context utterance embeddings per example
# Dense bf16 peak (H100 / H200 SXM), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}
# A card of N GB (N GiB of memory) "fits" a run whose peak leaves it half a GiB free.
CARDS_GB = (24, 16, 12)


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, seq // 2 :] = 1  # as `loss_positions` counts
    return {
        "input_ids": rng.randint(0, vocab, (batch, seq)).astype(np.int32),
        "attention_mask": np.ones((batch, seq), np.int32),
        "loss_mask": loss_mask,
        "row_mask": np.ones((batch,), np.int32),
        "style_id": (np.arange(batch) % 2).astype(np.int32),
        "response_latent": rng.randn(batch, N_LATENTS, LATENT_DIM).astype(np.float32),
        "context_embeddings": rng.randn(batch, N_CONTEXT, LATENT_DIM).astype(np.float32),
        "context_mask": np.ones((batch, N_CONTEXT), bool),
    }


def device_batch(size: str, batch: int, seq: int) -> dict[str, jax.Array]:
    """`synthetic_batch` for the model of `size`, on the default device."""
    vocab = BackboneConfig.from_hf_dict(SIZES[size]).vocab_size
    return {k: jnp.asarray(v) for k, v in synthetic_batch(batch, seq, vocab).items()}


@dataclasses.dataclass(frozen=True)
class TrainFlops:
    """Multiply-adds per token of one training step's forward pass, in three parts."""

    n: float  # N: every matrix product, attention's included
    n_attention: float  # the part of N from attention scores and values
    n_trainable: float  # the part of N whose weight matrix trains

    @property
    def per_token(self) -> float:
        """FLOPs per token: forward 2N, activation backward 2N, weight gradients 2N_trainable,
        and 2N_attention more because both operands of an attention product are activations
        (keys and values need their gradients too)."""
        return 2 * self.n + 2 * self.n + 2 * (self.n_trainable + self.n_attention)


def _rows(path: tuple[str, ...], seq: int, n_queries: int) -> int:
    """Rows per example that the matrix at `path` multiplies: the LLM's token positions, or
    the few vectors the LisenDiff modules work on."""
    reads_keys = "k_proj" in path or "v_proj" in path
    if "summary" in path:  # the style's queries read the context utterances
        return N_CONTEXT if reads_keys else n_queries
    if "denoisers" in path:  # the latent reads [timestep embedding; summary]
        if reads_keys:
            return 1 + n_queries
        return 1 if "time_mlp" in path else N_LATENTS
    if "cross_attn" in path:  # the tokens read the latents
        # One latent gives every token the same value, projected once per example (the module
        # then has no q/k projections: softmax over one key is 1).
        return N_LATENTS if reads_keys or (N_LATENTS == 1 and "o_proj" in path) else seq
    if "lm_head" in path:
        return loss_positions(seq)
    return seq


def loss_positions(seq: int) -> int:
    """Positions of a `synthetic_batch` row whose next token carries a loss (the second half):
    the only ones the LM head multiplies (`objectives.token_nll` skips the rest)."""
    return seq - seq // 2


def train_flops(model: LisenDiff, seq: int) -> TrainFlops:
    """Model FLOPs of one training step, per token of `seq`-token rows (`TrainFlops.per_token`:
    2N forward + 2N activation backward + 2N_trainable weight gradients + 2N_attention).

    N is the multiply-adds per token of every matrix product of the forward pass, from the
    model's own parameter shapes: each weight matrix (the backbone's projections, the LM head,
    LoRA's A and B, the cross-attention, style summary and denoiser matrices) times the rows it
    multiplies per example (the seq tokens, the `loss_positions` for the LM head; for the
    LisenDiff modules the latents, context utterances or summary queries, one row for the
    cross-attention's output projection when it reads one latent, and every style's denoiser
    runs on every example), plus each attention's scores and values, 2 x query rows x key rows x
    (heads x head_dim) per example (self-attention: 2 x seq x 4096 per token and layer on
    Llama-3.1-8B, the whole seq x seq square as the model computes it, the causal half not
    subtracted). The frozen weights get no gradient, so their backward pass is the
    activations' only, one product per matrix. Not counted: the embedding lookup,
    element-wise work (norms, softmax, activations, rotary, the optimizer) and recomputation
    from rematerialisation. `tests/test_bench_flops.py` checks N against the products JAX
    traces.
    """
    _, trainable, rest = nnx.split(model, model.trainable_filter(), ...)
    n_queries = model.summary.queries.shape[1] if model.summary is not None else 0
    n = attention = n_trainable = 0
    for state, trains in ((trainable, True), (rest, False)):
        for path, leaf in nnx.to_flat_state(state):
            path = tuple(map(str, path))
            # A quantized projection's weight matrix is its qvalue [in, out].
            if path[-1] not in ("kernel", "qvalue", "lora_a", "lora_b"):  # vectors, tables
                continue
            rows = _rows(path, seq, n_queries)
            entries = rows * math.prod(leaf.shape)  # multiply-adds per example
            n += entries
            n_trainable += entries if trains else 0
            if path[-1] in ("kernel", "qvalue") and "q_proj" in path:
                keys = _rows(tuple("k_proj" if p == "q_proj" else p for p in path), seq, n_queries)
                width = math.prod(leaf.shape[:-2]) * leaf.shape[-1]  # (styles x) heads x head_dim
                attention += 2 * rows * keys * width
    bc = model.backbone.config
    if bc.tie_word_embeddings:  # the embedding table is also the LM head
        n += loss_positions(seq) * bc.vocab_size * bc.hidden_size
    return TrainFlops(
        n=(n + attention) / seq, n_attention=attention / seq, n_trainable=n_trainable / seq
    )


def mfu(tokens_per_s: float, flops: TrainFlops, peak_tflops: float) -> float:
    """Model FLOPs utilisation: model FLOP/s achieved over the card's dense bf16 peak."""
    return tokens_per_s * flops.per_token / (peak_tflops * 1e12)


def bench_config(size: str, lisendiff: bool) -> ml_collections.ConfigDict:
    """The paper's settings; on the 34M model fp32 (Adam's moments too, as PEFT's AdamW keeps
    them), no remat and smaller cross-attention."""
    config = paper_config("bench", "ja", lisendiff)
    config.learning_rate = 1e-4
    m = config.model
    m.cross_attention.num_latents = N_LATENTS  # what synthetic_batch gives
    if size == "34m":
        # bf16 moments cost the CPU step about 5% in random bits for their stochastic rounding.
        config.optimizer_state_dtype = "float32"
        m.param_dtype = m.compute_dtype = "float32"
        m.remat = "none"
        m.cross_attention.last_n_layers = 4
        m.cross_attention.inner_dim = 256
    return config


def build_model(size: str, m: ml_collections.ConfigDict, quantization: str = "none") -> LisenDiff:
    bc = BackboneConfig.from_hf_dict(SIZES[size])
    kw = dict(dtype=jnp.dtype(m.compute_dtype), param_dtype=jnp.dtype(m.param_dtype))
    if quantization == "none":
        decoder = Decoder(bc, **kw, rngs=nnx.Rngs(0))
    else:
        decoder = quantized_decoder(bc, kw, quantization)
    return LisenDiff(decoder, m, LATENT_DIM, rngs=nnx.Rngs(params=1, dropout=2))


def quantized_decoder(bc: BackboneConfig, kw: dict, quantization: str) -> Decoder:
    """A random backbone whose projections are stored quantized, made layer by layer, each
    quantized in the jitted call that makes it: at most one layer is ever float. (Made whole,
    the float 8B, 15 GiB in bf16, would set the peak memory reported.)"""
    decoder = Decoder(dataclasses.replace(bc, num_layers=0), **kw, rngs=nnx.Rngs(0))
    make_layer = nnx.jit(
        lambda key: quantize_layer(DecoderLayer(bc, **kw, rngs=nnx.Rngs(key)), quantization)
    )
    decoder.layers = nnx.List([make_layer(jax.random.key(i + 1)) for i in range(bc.num_layers)])
    decoder.config = bc
    return decoder


def make_ours(
    size: str,
    lisendiff: bool,
    quantization: str = "none",
    attention: str = "auto",
    remat: str | None = None,
    compute_dtype: str | None = None,
) -> tuple[LisenDiff, dict, Callable[..., None]]:
    """A random model of `size` (its frozen projections stored as `quantization` says, its
    self-attention kernel `attention`, rematerialised as `remat` says and computing in
    `compute_dtype`, each when given, else as `bench_config`),
    its training state {"trainable", "opt", "temp_bytes"} and `one_step(batch, i, wait=True)`,
    which trains it one step of our jitted step (in place, key i), waiting for the step to
    finish if `wait`. `temp_bytes(batch)` is XLA's temporary memory for a step on `batch`,
    compiled, not run."""
    config = bench_config(size, lisendiff)
    m = config.model
    m.attention, m.remat = attention, remat or m.remat
    m.compute_dtype = compute_dtype or m.compute_dtype
    if quantization == "none":
        model = nnx.jit(functools.partial(build_model, size, m))()
    else:  # made outside jit: a jitted call would copy the quantized backbone it is given
        model = build_model(size, m, quantization)
    model.backbone.remat, model.backbone.attention = m.remat, m.attention
    graphdef, trainable, frozen = split_for_training(model)
    tx = make_optimizer(config, 1000)
    step = make_train_step(tx, functools.partial(training_loss, graphdef))
    state = {"trainable": trainable, "opt": tx.init(trainable)}

    def one_step(batch: dict[str, jax.Array], i: int, wait: bool = True) -> None:
        state["trainable"], state["opt"], metrics = step(
            state["trainable"], frozen, state["opt"], batch, jax.random.key(i)
        )
        if wait:
            jax.block_until_ready(metrics["loss"])

    def temp_bytes(batch: dict[str, jax.Array]) -> int:
        lowered = step.lower(state["trainable"], frozen, state["opt"], batch, jax.random.key(0))
        return lowered.compile().memory_analysis().temp_size_in_bytes

    state["temp_bytes"] = temp_bytes
    return model, state, one_step


def first_and_median(one_step: Callable[[int], None], steps: int) -> tuple[float, float]:
    """Seconds of step 0 (compile and warm-up) and the median of the next `steps`."""
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        one_step(i)
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def back_to_back(
    one_step: Callable[[int, bool], None], finish: Callable[[], None], steps: int
) -> tuple[float, float]:
    """Seconds per step of `steps` steps dispatched back to back, with one wait at the end, as
    the training loop runs them (it waits only at log steps): unlike the median of waited
    steps, the device's idle time between steps is hidden where dispatch runs ahead. Also the
    median seconds a step's call took to return (dispatch: the host's work per step, which a
    waited step adds to the device's idle time)."""
    calls = []
    start = time.perf_counter()
    for i in range(steps):
        call = time.perf_counter()
        one_step(i, False)
        calls.append(time.perf_counter() - call)
    finish()
    return (time.perf_counter() - start) / steps, statistics.median(calls)


def run_ours(args, lisendiff: bool, quantization: str = "none") -> dict:
    model, state, one_step = make_ours(
        args.size, lisendiff, quantization, args.attention[0], (args.remat or [None])[0]
    )
    flops = train_flops(model, args.seq)
    del model
    batch = device_batch(args.size, args.batch, args.seq)

    compile_s, seconds = first_and_median(functools.partial(one_step, batch), args.steps)
    chained, dispatch = back_to_back(
        lambda i, wait: one_step(batch, args.steps + 1 + i, wait),
        lambda: jax.block_until_ready(state["trainable"]),
        args.steps,
    )
    result = {
        "tokens_per_s": args.batch * args.seq / seconds,
        "back_to_back_tokens_per_s": args.batch * args.seq / chained,
        "dispatch_s": dispatch,
        "step_s": seconds,
        "compile_s": compile_s,
        "flops": flops,
        "trainable_M": sum(x.size for x in jax.tree.leaves(state["trainable"])) / 1e6,
    }
    stats_mem = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats_mem:
        result["peak_gib"] = stats_mem["peak_bytes_in_use"] / 2**30
    return result


def make_peft(args) -> Callable[..., None]:
    """transformers + PEFT's `one_step(wait=True)`: fp32 on the CPU; on a GPU bf16 weights
    with gradient checkpointing, the settings a user would pick to fit one card (as ours
    rematerialises)."""
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

    def one_step(wait: bool = True) -> None:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if gpu and wait:
            torch.cuda.synchronize()

    return one_step


def run_peft(args) -> dict:
    import torch

    gpu = torch.cuda.is_available()
    one_step = make_peft(args)
    _, seconds = first_and_median(lambda i: one_step(), args.steps)
    chained, dispatch = back_to_back(
        lambda i, wait: one_step(wait), torch.cuda.synchronize if gpu else lambda: None, args.steps
    )
    result = {
        "tokens_per_s": args.batch * args.seq / seconds,
        "back_to_back_tokens_per_s": args.batch * args.seq / chained,
        "dispatch_s": dispatch,
        "step_s": seconds,
    }
    if gpu:
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def run_in_turns(args) -> None:
    """Ours LoRA-only, once per `--attention` kernel and `--remat` policy (with XLA's temporary
    memory for its step), and transformers + PEFT unless `--no-peft`: one step of each in turn,
    so that a machine shared with other work slows all alike; medians and ratios."""
    batch = device_batch(args.size, args.batch, args.seq)
    steps: dict[str, Callable[[int], None]] = {}
    for attention, remat, dtype in itertools.product(
        args.attention, args.remat or [None], args.compute_dtype or [None]
    ):
        _, state, ours = make_ours(args.size, False, "none", attention, remat, dtype)
        name = f"attention {attention}" + (f" remat {remat}" if remat else "")
        name += f" {dtype}" if dtype else ""
        steps[name] = functools.partial(ours, batch)
        print(f"{name:>30}: XLA temporary memory {state['temp_bytes'](batch) / 2**20:.0f} MiB")
    if not args.no_peft:
        peft = make_peft(args)
        steps["peft"] = lambda i: peft()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.steps + 1):  # the first turn compiles and warms up
        for name, one_step in steps.items():
            start = time.perf_counter()
            one_step(i)
            if i:
                times[name].append(time.perf_counter() - start)
    tokens = {}
    for name, t in times.items():
        seconds = statistics.median(t)
        tokens[name] = args.batch * args.seq / seconds
        print(f"{name:>30}: {tokens[name]:9.1f} tok/s  step {seconds * 1e3:8.1f} ms  (in turns)")
    for name in tokens if "peft" in tokens else ():
        if name != "peft":
            ratio = tokens[name] / tokens["peft"]
            print(f"ratio ours lora_only {name} / transformers+PEFT: {ratio:.2f}")


def real_batches(
    esconv: str, batch: int, steps: int, max_length: int | None
) -> tuple[list, list, int, np.ndarray]:
    """The embedded default's data (configs/tiny.py: the bundled samples, its tokenizer, prompts
    and max_length unless `max_length` is given) plus ESConv from `esconv`, in epoch 0's order:
    its first `steps` bucketed batches and the packed batches of the same examples, with random
    latents and contexts in place of the cached embeddings (the step's cost does not depend on
    their values). Returns (bucketed, packed, K, every example's length in tokens)."""
    from transformers import AutoTokenizer

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    d = config.data
    d.sources.esconv_file = source("jsonl", esconv, 1.0)
    d.max_length = max_length or d.max_length
    mix = data_mix(config)
    tokenizer = AutoTokenizer.from_pretrained(backbone_folder(config.model.backbone))
    encoded = encode_examples(
        tokenizer, mix.examples, training_prompts(d, mix), d.max_length, progress=False
    )
    buckets, pad = length_buckets(d.max_length), tokenizer.pad_token_id or 0
    segments = packing_segments(encoded, d.max_length)
    rng = np.random.default_rng(0)

    def first(examples: int, segments: int) -> list[dict[str, jax.Array]]:
        """The batches of epoch 0 up to the one that holds its `examples`-th example."""
        out = []
        stream = iterate_batches(encoded, batch, buckets, pad, config.seed, segments=segments)
        for tokens, position in stream:
            index = tokens.pop("example_index")  # [batch], or packed [batch, K]
            tokens.update(
                response_latent=rng.standard_normal((*index.shape, N_LATENTS, LATENT_DIM)),
                context_embeddings=rng.standard_normal((*index.shape, N_CONTEXT, LATENT_DIM)),
                context_mask=np.ones((*index.shape, N_CONTEXT), bool),
                style_id=(index % 2).astype(np.int32),
            )
            out.append(
                {
                    k: jnp.asarray(v.astype(np.float32) if v.dtype == np.float64 else v)
                    for k, v in tokens.items()
                }
            )
            if position.offset >= examples or position.epoch:
                return out

    n = min(steps * batch, len(encoded))
    lengths = np.array([len(item.input_ids) for item in encoded])
    return first(n, 0), first(n, segments), segments, lengths


def run_packing(args) -> None:
    """Real tokens/s of our LisenDiff step, bucketed vs packed, on the same examples (each
    batch shape compiled before timing, the two timed in turns)."""
    bucketed, packed, segments, lengths = real_batches(
        args.packing, args.batch, args.steps, args.max_length
    )
    _, _, one_step = make_ours(args.size, lisendiff=True)
    print(
        f"data: {len(lengths)} examples (bundled samples + {args.packing}), tokenised as the "
        f"embedded default does{f' at max_length {args.max_length}' if args.max_length else ''}: "
        f"{lengths.min()} to {lengths.max()} tokens, median "
        f"{np.median(lengths):.0f}; packed rows of {packed[0]['input_ids'].shape[1]} tokens, "
        f"up to {segments} examples each"
    )
    runs = {"bucketed": bucketed, "packed": packed}
    shapes = {name: {b["input_ids"].shape: b for b in batches} for name, batches in runs.items()}
    for name in runs:  # compile every shape first
        for i, b in enumerate(shapes[name].values()):
            one_step(b, i)
    # Steps of the two in turns, so that both see the same load on a shared machine.
    seconds = dict.fromkeys(runs, 0.0)
    for i in range(max(map(len, runs.values()))):
        for name, batches in runs.items():
            if i < len(batches):
                start = time.perf_counter()
                one_step(batches[i], i)
                seconds[name] += time.perf_counter() - start
    results = {}
    for name, batches in runs.items():
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        slots = sum(b["input_ids"].size for b in batches)
        examples = sum(int(b.get("segment_mask", b.get("row_mask")).sum()) for b in batches)
        results[name] = real / seconds[name]
        print(
            f"{name:>10}: {results[name]:9.1f} real tok/s  "
            f"padding {100 * (1 - real / slots):4.1f}%  {examples} examples, {real} real "
            f"tokens in {len(batches)} steps of {args.batch} rows "
            f"(lengths {sorted(s[1] for s in shapes[name])}), {seconds[name]:.1f} s",
            flush=True,
        )
    print(f"ratio packed / bucketed (real tokens/s): {results['packed'] / results['bucketed']:.2f}")


def peak_tflops(device_kind: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_kind), None)


def mfu_from_log(path: str) -> None:
    """Prints FLOPs and MFU of each of our results in a log of this script (or of gpu_check.sh)
    from the tokens/s it recorded, with the model rebuilt abstractly (shapes only) at the
    logged size, then each one's ratio to a transformers + PEFT result in the same log."""
    size = seq = device_kind = peft = None
    ours = []
    for line in open(path, encoding="utf-8"):
        if m := re.search(r" on \w+ \((.+)\)$", line.strip()):
            device_kind = m.group(1)
        elif m := re.search(r"size (\w+); batch \d+ x seq (\d+)", line):
            size, seq = m.group(1), int(m.group(2))
        elif m := re.match(r"\s*peft:\s+([\d.]+) tok/s", line):
            peft = float(m.group(1))
        elif m := re.match(r"\s*(lora_only|lisendiff):\s+([\d.]+) tok/s", line):
            variant, tokens_per_s = m.group(1), float(m.group(2))
            if size is None or device_kind is None:
                raise SystemExit(f"{path}: a result before its 'machine:' and 'model:' lines")
            ours.append((variant, tokens_per_s))
            m_cfg = bench_config(size, variant == "lisendiff").model
            model = nnx.eval_shape(functools.partial(build_model, size, m_cfg))
            flops = train_flops(model, seq)
            trainable = nnx.state(model, model.trainable_filter())
            out = (
                f"{variant:>10}: {tokens_per_s:9.1f} tok/s  size {size} seq {seq}  "
                f"trainable {sum(x.size for x in jax.tree.leaves(trainable)) / 1e6:.1f}M  "
                f"N {flops.n / 1e9:.3f}G (attention {flops.n_attention / 1e9:.3f}G, "
                f"trainable {flops.n_trainable / 1e9:.3f}G)  "
                f"{flops.per_token / 1e9:.2f} GFLOP/token"
            )
            if peak := peak_tflops(device_kind):
                out += f"  MFU {100 * mfu(tokens_per_s, flops, peak):.1f}% of {peak:.0f} TFLOP/s"
            print(out, flush=True)
    for variant, tokens_per_s in ours if peft else ():
        print(f"ratio ours {variant} / transformers+PEFT: {tokens_per_s / peft:.2f}")


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
    parser.add_argument(
        "--base-quantization",
        nargs="+",
        default=["none"],
        choices=QUANTIZATIONS,
        help="how the frozen projections are stored (model.base_quantization), one run of each "
        "variant per value, side by side: e.g. none int8 nf4 (none: float)",
    )
    parser.add_argument(
        "--attention",
        nargs="+",
        default=["auto"],
        choices=ATTENTION_KERNELS,
        help="our self-attention kernel (model.attention; auto: cuDNN on a GPU, einsum on a "
        "CPU); with --in-turns, one run of each",
    )
    parser.add_argument(
        "--remat",
        nargs="+",
        choices=sorted(REMAT_POLICIES),
        help="the rematerialisation policy (model.remat; default the paper configs': full on "
        "the 8B model, none on the 34M); with --in-turns, one run of each",
    )
    parser.add_argument(
        "--compute-dtype",
        nargs="+",
        choices=["float32", "bfloat16"],
        help="with --in-turns, one run of each dtype of our products (model.compute_dtype; "
        "the weights keep theirs: float32 on the 34M model)",
    )
    parser.add_argument(
        "--in-turns",
        action="store_true",
        help="only ours LoRA-only (per --attention, --remat, --compute-dtype) and transformers "
        "+ PEFT, one step of each in turn (for a machine shared with other work)",
    )
    parser.add_argument(
        "--mfu-from-log",
        metavar="LOG",
        help="only recompute FLOPs, MFU and the ratios to PEFT from the tokens/s in a log "
        "of this script or of gpu_check.sh",
    )
    parser.add_argument(
        "--packing",
        metavar="ESCONV_JSONL",
        help="only compare bucketed and packed batches of real dialogue (the bundled samples "
        "plus this ESConv file in the JSONL dialogue format): real tokens/s and padding",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        metavar="TOKENS",
        help="with --packing, tokens per example and per packed row (data.max_length; default "
        "the embedded default's, 256)",
    )
    args = parser.parse_args()
    # Without --in-turns each policy would need its own process: the peak memory reported is
    # the process's.
    if args.remat and len(args.remat) > 1 and not args.in_turns:
        parser.error("--remat: give one policy, or several with --in-turns")
    if args.mfu_from_log:
        mfu_from_log(args.mfu_from_log)
        return

    device = jax.devices()[0]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores; jax {jax.__version__} "
        f"on {device.platform} ({device.device_kind})"
    )
    if args.packing:
        print(f"model: random Llama, size {args.size}, LisenDiff; batch {args.batch} rows")
        run_packing(args)
        return
    if args.in_turns:
        print(
            f"model: random Llama, size {args.size}; batch {args.batch} x seq {args.seq}; "
            f"median of {args.steps} steps in turns after one warm-up"
        )
        run_in_turns(args)
        return
    print(
        f"model: random Llama, size {args.size}; batch {args.batch} x seq {args.seq}; "
        f"median of {args.steps} steps after one warm-up, each waited for; then {args.steps} "
        "back to back, one wait at the end" + (f"; remat {args.remat[0]}" if args.remat else "")
    )
    results = {}
    for variant in args.variants:
        for quantization in args.base_quantization:
            name = variant if quantization == "none" else f"{variant} {quantization}"
            results[name] = run_ours(args, variant == "lisendiff", quantization)
    if not args.no_peft:
        results["peft"] = run_peft(args)
    peak = peak_tflops(device.device_kind)
    for name, r in results.items():
        line = f"{name:>14}: {r['tokens_per_s']:9.1f} tok/s  step {r['step_s'] * 1e3:8.1f} ms"
        if "compile_s" in r:
            line += f"  compile {r['compile_s']:.1f} s  trainable {r['trainable_M']:.1f}M"
            line += f"  {r['flops'].per_token / 1e9:.2f} GFLOP/token"
            if peak:
                line += f"  MFU {100 * mfu(r['tokens_per_s'], r['flops'], peak):.1f}%"
        line += f"  back-to-back {r['back_to_back_tokens_per_s']:.1f} tok/s"
        if peak and "flops" in r:
            line += f" (MFU {100 * mfu(r['back_to_back_tokens_per_s'], r['flops'], peak):.1f}%)"
        line += f"  dispatch {r['dispatch_s'] * 1e3:.1f} ms"
        if "peak_gib" in r:
            fits = (
                f"{gb} GB: {'fits' if r['peak_gib'] < gb - 0.5 else 'does NOT fit'}"
                for gb in CARDS_GB
            )
            line += f"  peak {r['peak_gib']:.2f} GiB ({', '.join(fits)})"
        print(line, flush=True)
    for variant in args.variants:
        for quantization in args.base_quantization if "none" in args.base_quantization else ():
            if quantization != "none":
                ratio = (
                    results[f"{variant} {quantization}"]["tokens_per_s"]
                    / results[variant]["tokens_per_s"]
                )
                print(f"ratio ours {variant} {quantization} / {variant} float: {ratio:.2f}")
    if "peft" in results:
        for variant in args.variants:  # when run together (on a GPU, run them apart for memory)
            ratio = results[variant]["tokens_per_s"] / results["peft"]["tokens_per_s"]
            print(f"ratio ours {variant} / transformers+PEFT: {ratio:.2f}")


if __name__ == "__main__":
    main()
