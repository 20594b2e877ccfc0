"""The training benchmark's FLOP count (benchmarks/bench_train_step.py `train_flops`, behind its
MFU figures) against the matrix products JAX actually traces for the 34M bench model."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.extend import core as jcore

from lisendiff_jax.backbone.presets import LLAMA_34M
from lisendiff_jax.method.model import split_for_training, training_loss

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"
_SPEC = importlib.util.spec_from_file_location("bench_train_step", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = bench  # dataclasses look their module up there
_SPEC.loader.exec_module(bench)

# 128 positions with loss per row: one chunk of the LM head's loop (objectives.token_nll), whose
# body the traced count takes once.
SEQ, BATCH = 256, 2


def dot_flops(jaxpr: jcore.Jaxpr) -> int:
    """2 x multiply-adds of every dot_general in `jaxpr` and the jaxprs inside it (a scan's
    body times its length, a while loop's body once)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
        inner = [
            x.jaxpr if isinstance(x, jcore.ClosedJaxpr) else x
            for v in eqn.params.values()
            for x in (v if isinstance(v, (tuple, list)) else (v,))
            if isinstance(x, (jcore.ClosedJaxpr, jcore.Jaxpr))
        ]
        if inner:
            times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
            total += times * max(dot_flops(j) for j in inner)
    return total


@pytest.fixture(
    params=["lisendiff", "lora_only", "tied_lora_only"],
)
def traced(request, monkeypatch):
    """(train_flops of the abstract 34M bench model, forward and gradient dot FLOPs traced)."""
    size = "34m"
    cfg = bench.bench_config(size, request.param == "lisendiff").model
    if request.param == "tied_lora_only":  # the embedding table doubles as the LM head
        size = "34m_tied"
        monkeypatch.setitem(bench.SIZES, size, dict(LLAMA_34M, tie_word_embeddings=True))
        cfg.train_lm_head = False
    model = nnx.eval_shape(functools.partial(bench.build_model, size, cfg))
    flops = bench.train_flops(model, SEQ)
    graphdef, trainable, frozen = split_for_training(model)
    vocab = model.backbone.config.vocab_size
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype)
        for k, v in bench.synthetic_batch(BATCH, SEQ, vocab).items()
    }
    loss = functools.partial(training_loss, graphdef)
    args = (trainable, frozen, batch, jax.random.key(0))
    forward = dot_flops(jax.make_jaxpr(loss)(*args).jaxpr)
    step = dot_flops(jax.make_jaxpr(jax.grad(loss, has_aux=True))(*args).jaxpr)
    return flops, forward, step


def test_forward_counts_every_matrix_product(traced):
    # Exactly: every projection, LoRA, the LM head, attention scores and values, and the
    # cross-attention, summary and denoisers with the rows they really multiply.
    flops, forward, _ = traced
    assert 2 * flops.n * BATCH * SEQ == pytest.approx(forward, rel=1e-9)


def test_training_step_matches_traced_gradient(traced):
    # The gradient's products (no rematerialisation in the 34M config) differ from the formula
    # only by the activation gradients JAX prunes (the first layer's input, the data latents).
    flops, forward, step = traced
    assert flops.per_token * BATCH * SEQ == pytest.approx(step, rel=0.02)
    assert flops.per_token * BATCH * SEQ >= step


def test_mfu_from_log_recomputes_the_recorded_run(tmp_path, capsys):
    log = tmp_path / "run.log"
    log.write_text(
        "machine: x86_64, 16 CPU cores; jax 0.11.2 on gpu (NVIDIA H200)\n"
        f"model: random Llama, size 34m; batch {BATCH} x seq {SEQ}; median of 5 steps\n"
        " lora_only:    1000.0 tok/s  step 1.0 ms  MFU 99.9%\n"
        "      peft:     400.0 tok/s  step 2.5 ms\n"
    )
    bench.mfu_from_log(str(log))
    model = nnx.eval_shape(
        functools.partial(bench.build_model, "34m", bench.bench_config("34m", False).model)
    )
    expected = 1000.0 * bench.train_flops(model, SEQ).per_token / 989e12
    out = capsys.readouterr().out
    assert f"MFU {100 * expected:.1f}% of 989 TFLOP/s" in out
    assert "ratio ours lora_only / transformers+PEFT: 2.50" in out


def test_flops_formula_parts():
    flops = bench.TrainFlops(n=10.0, n_attention=1.0, n_trainable=3.0)
    # forward 2N + activation backward 2N + weight gradients 2N_trainable + the keys' and
    # values' gradients 2N_attention
    assert flops.per_token == 2 * 10 + 2 * 10 + 2 * 3 + 2 * 1
    assert dataclasses.asdict(flops) == {"n": 10.0, "n_attention": 1.0, "n_trainable": 3.0}
