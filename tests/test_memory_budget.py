"""The memory arithmetic (benchmarks/memory_budget.py): its compiled analysis takes the remat
policies and GPU targets it is asked for, and refuses what it cannot do in one line."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_budget.py"
_SPEC = importlib.util.spec_from_file_location("memory_budget", _PATH)
budget = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(budget)


def test_the_remat_policy_asked_for_is_the_one_compiled(monkeypatch):
    """Compiling the 8B step takes minutes on a CPU; the model it would compile is checked."""

    class Built(Exception):
        pass

    seen = []

    def split(model):
        seen.append((model.backbone.remat, model.backbone.attention))
        raise Built

    monkeypatch.setattr(budget, "split_for_training", split)
    monkeypatch.syspath_prepend(str(_PATH.parent))  # as run: bench_train_step beside it
    for remat in ("dots", "attention", ""):
        with pytest.raises(Built):
            budget.compiled_memory("llama", "none", True, 1, remat)
    assert seen == [("dots", "auto"), ("attention", "auto"), ("full", "auto")]


def test_hlo_is_the_text_of_the_program_compiled(monkeypatch, tmp_path):
    """The 8B model and its training state are built abstractly as when measured; the step
    compiled is swapped for a small one that reads them, so the test takes seconds."""
    import jax

    def small_step(tx, loss, shardings, update):
        return jax.jit(
            lambda trainable, frozen, opt_state, batch, rng: batch["input_ids"].sum(),
            keep_unused=True,  # as the real step, which reads every argument
        )

    monkeypatch.setattr(budget, "make_train_step", small_step)
    monkeypatch.syspath_prepend(str(_PATH.parent))
    hlo = tmp_path / "step.hlo.txt"
    sizes = budget.compiled_memory("llama", "none", True, 1, "", None, hlo)
    text = hlo.read_text()
    assert text.startswith("HloModule") and "reduce(" in text
    assert sizes["arguments"] > 15  # GiB: the frozen 8B weights are among the arguments


def test_a_gpu_target_jax_cannot_compile_for_is_refused_in_one_line(monkeypatch):
    from jax.experimental import topologies

    def no_cuda(**kwargs):
        raise RuntimeError("topology not implemented for cuda\nmore detail")

    monkeypatch.setattr(topologies, "get_topology_desc", no_cuda)
    with pytest.raises(SystemExit) as exit_:
        budget.target_mesh("h200")
    message = str(exit_.value)
    assert message.startswith("--target h200: jax cannot compile for a CUDA GPU here")
    assert "\n" not in message and "jax[cuda13]" in message


def test_remat_target_and_hlo_need_compiled(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["memory_budget.py", "--remat", "dots"])
    with pytest.raises(SystemExit) as exit_:
        budget.main()
    assert exit_.value.code == 2
    assert "--remat, --target and --hlo go with --compiled" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["memory_budget.py", "--compiled", "--hlo", "missing"])
    with pytest.raises(SystemExit):
        budget.main()
    assert "--hlo missing: not a directory" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["memory_budget.py", "--compiled", "--target", "a100"])
    with pytest.raises(SystemExit):
        budget.main()
    assert "argument --target: invalid choice: 'a100'" in capsys.readouterr().err
