"""The head-update benchmark (benchmarks/bench_head_update.py) runs every mode and torch side by
side, and its "before" mode really draws one hash per value, leaving the rounding as it was."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from lisendiff_jax.train import rounding

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_head_update.py"
_SPEC = importlib.util.spec_from_file_location("bench_head_update", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def rounding_program() -> str:
    """The traced rounding of a [8, 12] array (a new function each time: JAX caches traces)."""
    x = jnp.zeros((8, 12), jnp.float32)
    program = jax.make_jaxpr(lambda x, key: rounding.stochastic_round(x, jnp.bfloat16, key))
    return str(program(x, jax.random.key(0)))


def test_one_hash_per_value_swaps_the_bits_in_and_back_out():
    ours = rounding_program()
    assert "threefry2x32" in ours and "random_bits[bit_width=32 shape=(8, 12)]" not in ours
    with bench.one_hash_per_value():
        before = rounding_program()
    assert "threefry2x32" not in before and "random_bits[bit_width=32 shape=(8, 12)]" in before
    assert rounding_program() == ours


def test_every_mode_and_torch_run_side_by_side(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_head_update.py", "--steps", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "bf16 LM head 16000 x 512 (8M values)" in out
    for mode in bench.MODES:
        assert f"ours {mode}:" in out
    assert "torch AdamW (" in out
    ratios = [line for line in out.splitlines() if line.startswith("ratio ours stochastic / ")]
    assert len(ratios) == len(bench.MODES)  # the other three modes and torch
