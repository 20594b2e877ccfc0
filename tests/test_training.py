"""LisenDiff training: what trains, what stays frozen, that it learns, and that it resumes."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_checkpoints import make_checkpoint
from tiny_workdir import write_dialogues

from lisendiff_jax.backbone import load_backbone
from lisendiff_jax.config import load_config
from lisendiff_jax.method.model import (
    LisenDiff,
    ModelSettingsError,
    split_for_training,
    training_loss,
)
from lisendiff_jax.method.objectives import token_nll
from lisendiff_jax.train.loop import Trainer, TrainingError
from lisendiff_jax.train.step import make_optimizer, make_train_step

ROOT = Path(__file__).resolve().parents[1]
D_ENC = 16


def tiny_model_config(lisendiff=True):
    c = load_config(ROOT / "configs" / "tiny.py")
    c.model.lisendiff = lisendiff
    c.model.lora.dropout = 0.0
    c.model.cross_attention.num_heads = 2
    c.model.summary.num_heads = c.model.denoiser.num_heads = 2
    c.warmup_steps = 0  # so that the very first update moves the parameters
    return c


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama_gqa_llama3", folder)
    return folder


def random_batch(rng, batch=2, seq=12, vocab=128):
    ids = rng.randint(3, vocab, (batch, seq)).astype(np.int32)
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, seq // 2 :] = 1
    return {
        "input_ids": ids,
        "attention_mask": np.ones((batch, seq), np.int32),
        "loss_mask": loss_mask,
        "row_mask": np.ones((batch,), np.int32),
        "style_id": np.arange(batch, dtype=np.int32) % 2,
        "response_latent": rng.randn(batch, 1, D_ENC).astype(np.float32),
        "context_embeddings": rng.randn(batch, 3, D_ENC).astype(np.float32),
        "context_mask": np.array([[True, True, False]] * batch),
    }


def build(checkpoint, lisendiff=True):
    c = tiny_model_config(lisendiff)
    c.model.param_dtype = c.model.compute_dtype = "float32"
    model = LisenDiff(load_backbone(checkpoint), c.model, D_ENC, rngs=nnx.Rngs(0))
    return c, model


def test_step0_logits_equal_the_backbone(checkpoint):
    _, model = build(checkpoint)
    batch = random_batch(np.random.RandomState(0))
    ours = model.backbone(batch["input_ids"], latents=jnp.asarray(batch["response_latent"]))
    reference = load_backbone(checkpoint)(batch["input_ids"])
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def _one_step(checkpoint, lisendiff, remat="none"):
    c, model = build(checkpoint, lisendiff)
    model.backbone.remat = remat
    graphdef, trainable, frozen = split_for_training(model)
    before_trainable = jax.tree.map(np.array, trainable)
    before_rest = jax.tree.map(np.array, frozen[2])  # the frozen weights
    tx = make_optimizer(c, 10)
    opt_state = tx.init(trainable)
    step = make_train_step(tx, functools.partial(training_loss, graphdef))
    batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.RandomState(1)).items()}
    trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(0))
    return before_trainable, trainable, before_rest, frozen[2], opt_state, metrics


@pytest.mark.parametrize("lisendiff", [True, False])
def test_one_step_changes_only_trainable_parameters(checkpoint, lisendiff):
    b_train, train, b_frozen, frozen, opt_state, metrics = _one_step(checkpoint, lisendiff)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    if not lisendiff:
        assert float(metrics["diff_loss"]) == 0.0
    for path, before in nnx.to_flat_state(b_frozen):
        np.testing.assert_array_equal(before[...], dict(nnx.to_flat_state(frozen))[path][...])
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(train)}
    # LoRA B starts at zero and must move; so must the trained head.
    assert any(p.endswith("q_proj.lora_b") for p in paths)
    assert "backbone.lm_head.kernel" in paths
    assert any("cross_attn" in p for p in paths) == lisendiff
    assert any("denoisers" in p for p in paths) == lisendiff
    frozen_parts = ("embed_tokens", "base.kernel", ".mlp.", "layernorm", "backbone.norm")
    backbone_paths = [p for p in paths if p.startswith("backbone.") and "cross_attn" not in p]
    assert not any(part in p for p in backbone_paths for part in frozen_parts)
    after = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(train)}
    still = {
        p
        for p, v in nnx.to_flat_state(b_train)
        if np.array_equal(v[...], after[".".join(map(str, p))])
    }
    still = {".".join(map(str, p)) for p in still}
    # Zero-initialised B and cross-attention outputs leave what feeds them without a gradient
    # on the first step; everything else moves.
    first_step_blind = ("lora_a", "cross_attn.norm", "cross_attn.latent_norm", "q_proj.kernel")
    first_step_blind += ("k_proj.kernel", "v_proj.kernel")
    assert all(any(b in p for b in first_step_blind) for p in still), still
    assert any(p.endswith("lora_b") for p in paths - still)
    assert "backbone.lm_head.kernel" not in still
    # Adam keeps exactly two moments per trainable value, and nothing for frozen weights.
    n_trainable = sum(x.size for x in jax.tree.leaves(train))
    n_moments = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert n_moments == 2 * n_trainable
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    assert n_frozen > n_trainable


def test_gradient_accumulation_equals_one_big_batch(checkpoint):
    """Two accumulated micro-batches of 2 make the same update as one batch of 4 (LoRA-only,
    so no per-example diffusion noise; equal token counts, so the means agree)."""
    big = {k: jnp.asarray(v) for k, v in random_batch(np.random.RandomState(2), batch=4).items()}
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]

    def train(batches, accum):
        c, model = build(checkpoint, lisendiff=False)
        c.grad_accum_steps = accum
        graphdef, trainable, frozen = split_for_training(model)
        initial = jax.tree.map(np.array, trainable)
        tx = make_optimizer(c, 10)
        opt_state = tx.init(trainable)
        step = make_train_step(tx, functools.partial(training_loss, graphdef))
        for batch in batches:
            trainable, opt_state, _ = step(trainable, frozen, opt_state, batch, jax.random.key(0))
        return initial, trainable

    initial, accumulated = train(halves, 2)
    _, single = train([big], 1)
    lr = tiny_model_config().learning_rate
    for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(single), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0.01 * lr)
    moved = [
        not np.array_equal(np.asarray(a), b)
        for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(initial), strict=True)
    ]
    assert sum(moved) >= len(moved) // 2  # the update happened (lora_a waits for lora_b)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_rematerialisation_changes_memory_not_results(checkpoint, remat):
    _, plain, _, _, _, plain_metrics = _one_step(checkpoint, True)
    _, remat_train, _, _, _, remat_metrics = _one_step(checkpoint, True, remat)
    np.testing.assert_allclose(float(remat_metrics["loss"]), float(plain_metrics["loss"]), 1e-6)
    # Adam's first step moves each value by about the learning rate whatever the gradient's
    # size, so float noise in a tiny gradient shows up at that scale: agree to 1% of it.
    lr = tiny_model_config().learning_rate
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat_train), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0.01 * lr)


def test_settings_the_backbone_cannot_take_are_named(checkpoint, tmp_path):
    c = tiny_model_config()
    c.model.cross_attention.last_n_layers = 7
    with pytest.raises(ModelSettingsError, match="last_n_layers: 7 exceeds the backbone's 3"):
        LisenDiff(load_backbone(checkpoint), c.model, D_ENC, rngs=nnx.Rngs(0))
    make_checkpoint("llama_tied", tmp_path)
    with pytest.raises(ModelSettingsError, match="train_lm_head"):
        LisenDiff(load_backbone(tmp_path), tiny_model_config().model, D_ENC, rngs=nnx.Rngs(0))


def test_chunked_nll_equals_full_cross_entropy():
    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.randn(2, 11, 8), jnp.float32)
    head = jnp.asarray(rng.randn(8, 30), jnp.float32)
    targets = jnp.asarray(rng.randint(0, 30, (2, 11)), jnp.int32)
    weights = jnp.asarray(rng.rand(2, 11) > 0.3, jnp.float32)
    logits = hidden @ head
    full = -jnp.sum(
        jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0] * weights
    )
    # Budgets of 1, 4, 10 and all 11 positions' logits per chunk (2 rows x 30 x 4 bytes each).
    for positions in (1, 4, 10, 11):
        budget = positions * 2 * 30 * 4
        chunked = token_nll(lambda h: h @ head, hidden, targets, weights, 30, budget)
        np.testing.assert_allclose(float(chunked), float(full), rtol=1e-5)
        grad = jax.grad(
            lambda h, b=budget: token_nll(lambda x: x @ head, h, targets, weights, 30, b)
        )
        full_grad = jax.grad(
            lambda h: (
                -jnp.sum(
                    jnp.take_along_axis(jax.nn.log_softmax(h @ head), targets[..., None], -1)[
                        ..., 0
                    ]
                    * weights
                )
            )
        )
        np.testing.assert_allclose(grad(hidden), full_grad(hidden), rtol=1e-4, atol=1e-6)


# -- the whole loop on the tiny default backbone and a few bundled-style dialogues ----------


def loop_config(tmp_path: Path, num_steps: int, checkpoint_every: int):
    c = load_config(ROOT / "configs" / "tiny.py")
    for name in list(c.data.sources):
        del c.data.sources[name]
    c.data.sources.mine = dict(
        format="jsonl", path=str(write_dialogues(tmp_path / "d.jsonl")), fraction=1.0, split=""
    )
    c.data.max_length = 96
    c.batch_size = 2
    # Rows split over 2 of the 8 test devices, the model also over the other factor of 4.
    c.mesh.fsdp, c.mesh.tensor = 2, -1
    c.num_steps, c.checkpoint_every, c.log_every = num_steps, checkpoint_every, 1
    c.learning_rate, c.warmup_steps = 3e-3, 0
    return c


def flat_params(trainer: Trainer) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(trainer.trainable)}


def test_loss_falls_when_overfitting(tmp_path):
    c = loop_config(tmp_path, num_steps=40, checkpoint_every=1000)
    trainer = Trainer(c, tmp_path / "run", progress=False)
    trainer.run()
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    first, last = records[0], np.mean([r["loss"] for r in records[-5:]])
    assert last < 0.6 * first["loss"], (first, last)
    assert np.mean([r["lm_loss"] for r in records[-5:]]) < first["lm_loss"]
    assert np.mean([r["diff_loss"] for r in records[-5:]]) < first["diff_loss"]
    trainer.close()


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    straight = Trainer(loop_config(tmp_path, 7, 1000), tmp_path / "straight", progress=False)
    straight.run()
    killed = Trainer(loop_config(tmp_path, 7, 3), tmp_path / "killed", progress=False)
    killed.run(until=5)  # checkpoints at 3; steps 4-5 are lost as in a kill
    killed.checkpointer.wait()
    resumed = Trainer(loop_config(tmp_path, 7, 3), tmp_path / "killed", progress=False)
    assert resumed.step == 3
    resumed.run()
    a, b = flat_params(straight), flat_params(resumed)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))
    opt_a, opt_b = jax.tree.leaves(straight.opt_state), jax.tree.leaves(resumed.opt_state)
    for x, y in zip(opt_a, opt_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for t in (straight, killed, resumed):
        t.close()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(loop_config(tmp_path, 6, 2), tmp_path / "run", progress=False)
    trainer.run(until=2)
    trainer.checkpointer.wait()
    poisoned = np.array(trainer.split.vectors)
    poisoned[:] = np.nan
    trainer.split = type(trainer.split)(**{**trainer.split.__dict__, "vectors": poisoned})
    with pytest.raises(TrainingError, match="non-finite loss.*last good checkpoint: 2"):
        trainer.run()
    assert trainer.checkpointer.all_steps() == [2]
    trainer.close()


def test_changed_model_settings_refuse_an_existing_workdir(tmp_path):
    Trainer(loop_config(tmp_path, 1, 1000), tmp_path / "run", progress=False).close()
    c = loop_config(tmp_path, 1, 1000)
    c.model.lora.rank = 4
    with pytest.raises(ValueError, match=r"--config\.model\.lora\.rank \(16 there, 4 now\)"):
        Trainer(c, tmp_path / "run", progress=False)


def _train_cmd(workdir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"--workdir={workdir}", *overrides]


def test_train_py_default_runs_end_to_end_then_ctrl_c_saves(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run = subprocess.run(
        _train_cmd(tmp_path / "w", "--config.num_steps=6", "--config.checkpoint_every=3"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "checkpoint: " in run.stdout and "next: python sample.py" in run.stdout
    assert sorted(p.name for p in (tmp_path / "w").iterdir() if p.name.isdigit()) == ["3", "6"]
    assert len((tmp_path / "w" / "metrics.jsonl").read_text().splitlines()) >= 1

    # A long run, interrupted once training is under way, saves where it stopped.
    proc = subprocess.Popen(
        _train_cmd(tmp_path / "w", "--config.num_steps=100000", "--config.log_every=1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    metrics = tmp_path / "w" / "metrics.jsonl"
    deadline = time.time() + 300
    while len(metrics.read_text().splitlines()) < 4 and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted at step" in out
    steps = sorted(int(p.name) for p in (tmp_path / "w").iterdir() if p.name.isdigit())
    assert steps[-1] > 6


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--config.lr_schedule=exp",
            "error: --config.lr_schedule: 'exp' is not one of constant, cosine, linear",
        ),
        (
            "--config.model.lora.rnak=4",
            "error: --config.model.lora.rnak: no such option (did you mean 'model.lora.rank'?)",
        ),
        (
            "--config.model.cross_attention.last_n_layers=9",
            "error: --config.model.cross_attention.last_n_layers: 9 exceeds the backbone's "
            "4 layers",
        ),
    ],
)
def test_train_py_bad_option_is_one_line(tmp_path, override, message):
    run = subprocess.run(
        _train_cmd(tmp_path / "w", override), capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 1
    # The last line is the error; before it at most the tiny backbone's first-use build shows.
    assert run.stderr.strip().splitlines()[-1] == message
    assert "Traceback" not in run.stderr
    assert not any(p.name.isdigit() for p in (tmp_path / "w").glob("*"))
