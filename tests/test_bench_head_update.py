"""The head-update benchmark (benchmarks/bench_head_update.py) runs every mode and torch side by
side."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_head_update.py"
_SPEC = importlib.util.spec_from_file_location("bench_head_update", _PATH)
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)


def test_every_mode_and_torch_run_side_by_side(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_head_update.py", "--steps", "1"])
    bench.main()
    out = capsys.readouterr().out
    assert "bf16 LM head 512 x 16000 (8M values)" in out
    for mode in bench.MODES:
        assert f"ours {mode}:" in out
    assert "torch AdamW (" in out
    ratios = [line for line in out.splitlines() if line.startswith("ratio ours stochastic / ")]
    assert len(ratios) == len(bench.MODES)  # the other modes and torch
