"""LisenDiff training: what trains, what stays frozen, that it learns, and that it resumes."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx
from test_sharding import plan, subprocess_xla_flags
from tiny_checkpoints import make_checkpoint
from tiny_workdir import write_dialogues

from lisendiff_jax.backbone import load_backbone
from lisendiff_jax.config import ConfigError, check_data_paths, load_config, validate
from lisendiff_jax.data import formatting
from lisendiff_jax.data.formatting import SYSTEM_PROMPTS
from lisendiff_jax.method.model import (
    LisenDiff,
    ModelSettingsError,
    split_for_training,
    training_loss,
)
from lisendiff_jax.method.objectives import token_nll
from lisendiff_jax.train import loop
from lisendiff_jax.train.loop import MetricsLog, Trainer, TrainingError, _check_workdir_config
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


def random_batch(rng, batch=2, seq=12, vocab=128, n_latents=1):
    ids = rng.randint(3, vocab, (batch, seq)).astype(np.int32)
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, seq // 2 :] = 1
    return {
        "input_ids": ids,
        "attention_mask": np.ones((batch, seq), np.int32),
        "loss_mask": loss_mask,
        "row_mask": np.ones((batch,), np.int32),
        "style_id": np.arange(batch, dtype=np.int32) % 2,
        "response_latent": rng.randn(batch, n_latents, D_ENC).astype(np.float32),
        "context_embeddings": rng.randn(batch, 3, D_ENC).astype(np.float32),
        "context_mask": np.array([[True, True, False]] * batch),
    }


def build(checkpoint, lisendiff=True, n_latents=1, context_dropout=0.0):
    c = tiny_model_config(lisendiff)
    c.model.param_dtype = c.model.compute_dtype = "float32"
    c.model.cross_attention.num_latents = n_latents
    c.model.denoiser.context_dropout = context_dropout
    model = LisenDiff(load_backbone(checkpoint), c.model, D_ENC, rngs=nnx.Rngs(0))
    return c, model


def test_step0_logits_equal_the_backbone(checkpoint):
    _, model = build(checkpoint)
    batch = random_batch(np.random.RandomState(0))
    ours = model.backbone(batch["input_ids"], latents=jnp.asarray(batch["response_latent"]))
    reference = load_backbone(checkpoint)(batch["input_ids"])
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def _train_steps(checkpoint, lisendiff, remat="none", steps=1, n_latents=1):
    c, model = build(checkpoint, lisendiff, n_latents)
    model.backbone.remat = remat
    graphdef, trainable, frozen = split_for_training(model)
    before_trainable = jax.tree.map(np.array, trainable)
    before_rest = jax.tree.map(np.array, frozen[2])  # the frozen weights
    tx = make_optimizer(c, 10)
    opt_state = tx.init(trainable)
    step = make_train_step(tx, functools.partial(training_loss, graphdef))
    batch = random_batch(np.random.RandomState(1), n_latents=n_latents)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    for i in range(steps):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(i))
    return before_trainable, trainable, before_rest, frozen[2], opt_state, metrics


@pytest.mark.parametrize(
    ("lisendiff", "n_latents"),
    # One latent is what the data pipeline gives (the module then has no query norm or q/k,
    # which softmax over one key would leave without gradient); two exercise q/k.
    [(True, 1), (True, 2), (False, 1)],
)
def test_two_steps_change_every_trainable_parameter_and_nothing_else(
    checkpoint, lisendiff, n_latents
):
    b_train, train, b_frozen, frozen, opt_state, metrics = _train_steps(
        checkpoint, lisendiff, steps=2, n_latents=n_latents
    )
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    if not lisendiff:
        assert float(metrics["diff_loss"]) == 0.0
    for path, before in nnx.to_flat_state(b_frozen):
        np.testing.assert_array_equal(before[...], dict(nnx.to_flat_state(frozen))[path][...])
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(train)}
    # The adapters and the LM head train; the backbone's own weights do not.
    assert any(p.endswith("q_proj.lora_b") for p in paths)
    assert "backbone.lm_head.kernel" in paths
    assert any("cross_attn" in p for p in paths) == lisendiff
    assert any("denoisers" in p for p in paths) == lisendiff
    query_side = ("cross_attn.norm.scale", "cross_attn.attn.q_proj", "cross_attn.attn.k_proj")
    assert any(q in p for p in paths for q in query_side) == (lisendiff and n_latents > 1)
    frozen_parts = ("embed_tokens", "base.kernel", ".mlp.", "layernorm", "backbone.norm")
    backbone_paths = [p for p in paths if p.startswith("backbone.") and "cross_attn" not in p]
    assert not any(part in p for p in backbone_paths for part in frozen_parts)
    # Two steps, because LoRA B and the cross-attention output projections start at zero:
    # what feeds them (LoRA A, the cross-attention norms and q/k/v) gets a zero gradient on
    # the first step, and a nonzero one once they have moved. After the second, every
    # trainable tensor must have moved.
    after = {p: v[...] for p, v in nnx.to_flat_state(train)}
    still = [
        ".".join(map(str, p))
        for p, v in nnx.to_flat_state(b_train)
        if np.array_equal(v[...], after[p])
    ]
    assert not still, still
    # Adam keeps exactly two moments per trainable value, and nothing for frozen weights
    # (besides the step count and the uint32 key its stochastic rounding draws from).
    n_trainable = sum(x.size for x in jax.tree.leaves(train))
    floats = [x for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    n_moments = sum(x.size for x in floats)
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


@functools.cache
def _one_plain_step(checkpoint):
    """One LisenDiff step without rematerialisation: what every remat policy must reproduce."""
    return _train_steps(checkpoint, True)


@pytest.mark.parametrize("remat", ["full", "dots", "attention"])
def test_rematerialisation_changes_memory_not_results(checkpoint, remat):
    _, plain, _, _, _, plain_metrics = _one_plain_step(checkpoint)
    _, remat_train, _, _, _, remat_metrics = _train_steps(checkpoint, True, remat)
    np.testing.assert_allclose(float(remat_metrics["loss"]), float(plain_metrics["loss"]), 1e-6)
    # Adam's first step moves each value by about the learning rate whatever the gradient's
    # size, so float noise in a tiny gradient shows up at that scale: agree to 1% of it.
    lr = tiny_model_config().learning_rate
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat_train), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=0.01 * lr)


def test_xla_attention_kernel_gives_the_einsum_gradients(checkpoint):
    """The training loss's gradients with jax.nn.dot_product_attention (implementation="xla")
    equal the einsum reference's, on rows with right padding, within 1e-5 of each tensor's
    largest entry."""
    batch = random_batch(np.random.RandomState(2))
    batch["attention_mask"][1, -4:] = 0
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    grads = {}
    for kernel in ("einsum", "xla"):
        _, model = build(checkpoint, lisendiff=False)
        model.backbone.attention = kernel
        graphdef, trainable, frozen = split_for_training(model)
        loss = functools.partial(training_loss, graphdef, frozen=frozen, batch=batch)
        grad = jax.jit(jax.grad(lambda t, f=loss: f(t, rng=jax.random.key(0))[0]))
        grads[kernel] = grad(trainable)
    for a, b in zip(jax.tree.leaves(grads["einsum"]), jax.tree.leaves(grads["xla"]), strict=True):
        scale = float(np.abs(np.asarray(a)).max()) or 1.0
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * scale)


def test_settings_the_backbone_cannot_take_are_named(checkpoint, tmp_path):
    c = tiny_model_config()
    c.model.cross_attention.last_n_layers = 7
    with pytest.raises(ModelSettingsError, match="last_n_layers: 7 exceeds the backbone's 3"):
        LisenDiff(load_backbone(checkpoint), c.model, D_ENC, rngs=nnx.Rngs(0))
    make_checkpoint("llama_tied", tmp_path)
    with pytest.raises(ModelSettingsError, match="train_lm_head"):
        LisenDiff(load_backbone(tmp_path), tiny_model_config().model, D_ENC, rngs=nnx.Rngs(0))


def reference_nll(hidden, head, targets, weights):
    """The NLL as autodiff sees it: the whole sequence's float32 logits, then log-softmax."""
    logits = jnp.einsum("btd,dv->btv", hidden, head, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits)
    return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0] * weights)


@pytest.mark.parametrize("keep", [True, False])  # gradients kept from the forward, or recomputed
def test_chunked_nll_and_gradients_equal_full_cross_entropy(keep):
    rng = np.random.RandomState(0)
    hidden = jnp.asarray(rng.randn(2, 11, 8), jnp.float32)
    head = jnp.asarray(rng.randn(8, 30), jnp.float32)
    targets = jnp.asarray(rng.randint(0, 30, (2, 11)), jnp.int32)
    weights = jnp.asarray((rng.rand(2, 11) > 0.3) * rng.rand(2, 11), jnp.float32)
    want = reference_nll(hidden, head, targets, weights)
    want_grads = jax.grad(reference_nll, (0, 1))(hidden, head, targets, weights)
    # Chunks of 1, 4, 10 and all 11 positions; the head's gradient (8 x 30 x 4 bytes) is kept
    # from the forward pass when it fits the budget.
    for positions in (1, 4, 10, 11):
        budget = 8 * 30 * 4 if keep else 8 * 30 * 4 - 1

        def nll(h, w, p=positions, budget=budget):
            return token_nll(h, w, targets, weights, max_logits_bytes=budget, chunk_positions=p)

        np.testing.assert_allclose(float(jax.jit(nll)(hidden, head)), float(want), rtol=1e-5)
        grads = jax.jit(jax.grad(nll, (0, 1)))(hidden, head)
        for got, ref in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    # A frozen head: only the hidden states' gradient, the same.
    grad = jax.grad(lambda h: token_nll(h, head, targets, weights, chunk_positions=4))(hidden)
    np.testing.assert_allclose(grad, want_grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("keep", [True, False])
def test_chunked_nll_in_bf16_follows_autodiff(keep):
    """As the paper configs run it: bf16 hidden states and head, float32 logits; gradients come
    back in bf16, within bf16's rounding of autodiff's."""
    rng = np.random.RandomState(2)
    hidden = jnp.asarray(rng.randn(2, 11, 8), jnp.bfloat16)
    head = jnp.asarray(rng.randn(8, 30), jnp.bfloat16)
    targets = jnp.asarray(rng.randint(0, 30, (2, 11)), jnp.int32)
    weights = jnp.asarray(rng.rand(2, 11) > 0.3, jnp.float32)

    def reference(h, w):
        return reference_nll(h, w, targets, weights)

    def nll(h, w):
        budget = 8 * 30 * 2 if keep else 8 * 30 * 2 - 1  # the bf16 head's gradient fits, or not
        return token_nll(h, w, targets, weights, jnp.bfloat16, budget, chunk_positions=4)

    np.testing.assert_allclose(float(nll(hidden, head)), float(reference(hidden, head)), rtol=1e-5)
    for got, want in zip(
        jax.grad(nll, (0, 1))(hidden, head), jax.grad(reference, (0, 1))(hidden, head), strict=True
    ):
        assert got.dtype == jnp.bfloat16
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max())


def test_chunked_nll_computes_no_chunk_without_loss():
    """Positions without loss (NaN here) are never multiplied by the head when they fill whole
    chunks, in the forward or the backward pass: one NaN product would make the loss NaN."""
    rng = np.random.RandomState(1)
    hidden = rng.randn(3, 16, 8).astype(np.float32)
    weights = np.zeros((3, 16), np.float32)
    for row in range(3):  # four weighted positions per row, scattered: one chunk of 4 each
        weights[row, rng.choice(16, 4, replace=False)] = 1.0
    hidden[weights == 0] = np.nan
    head = jnp.asarray(rng.randn(8, 30), jnp.float32)
    targets = jnp.asarray(rng.randint(0, 30, (3, 16)), jnp.int32)
    clean = np.where(weights[..., None] > 0, hidden, 0.0)
    want = reference_nll(jnp.asarray(clean), head, targets, jnp.asarray(weights))

    def nll(h, w):
        return token_nll(h, w, targets, jnp.asarray(weights), chunk_positions=4)

    np.testing.assert_allclose(float(nll(jnp.asarray(hidden), head)), float(want), rtol=1e-5)
    d_hidden, d_head = jax.grad(nll, (0, 1))(jnp.asarray(hidden), head)
    assert np.isfinite(d_head).all() and np.isfinite(d_hidden).all()
    np.testing.assert_array_equal(np.asarray(d_hidden)[weights == 0], 0.0)


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
    c.num_steps, c.checkpoint_every, c.log_every = num_steps, checkpoint_every, 1
    c.learning_rate, c.warmup_steps = 3e-3, 0
    return c


def loop_trainer(config, workdir: Path) -> Trainer:
    """A Trainer on 4 of the 8 test devices, rows and weights split 2 ways (fsdp) and weights
    2 ways more (tensor): the sharded path, at about half the cost of a step on all 8 virtual
    devices of a few cores."""
    return Trainer(config, workdir, progress=False, mesh=plan((1, 2, 2)))


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the TensorBoard event files in `folder`, read as
    TensorBoard reads them: TFRecords (length, its masked CRC, an Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    scalars: dict[str, list[tuple[int, float]]] = {}
    for file in sorted(folder.glob("events.out.tfevents.*")):
        data, offset = file.read_bytes(), 0
        while offset < len(data):
            header = data[offset : offset + 8]
            (length,) = struct.unpack("<Q", header)
            body = data[offset + 12 : offset + 12 + length]
            crcs = struct.unpack_from("<I", data, offset + 8) + struct.unpack_from(
                "<I", data, offset + 12 + length
            )
            assert crcs == (masked_crc32c(header), masked_crc32c(body)), file
            event = Event.FromString(body)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
            offset += 16 + length
    return scalars


def test_metrics_log_writes_tensorboard_events_without_torch(tmp_path):
    log = MetricsLog(tmp_path)
    log.write({"loss": 2.5, "lm_loss": 2.0, "step": 1})
    log.write({"loss": 1.5, "lm_loss": 1.25, "step": 2})
    log.close()
    assert tensorboard_scalars(tmp_path / "tensorboard") == {
        "loss": [(1, 2.5), (2, 1.5)],
        "lm_loss": [(1, 2.0), (2, 1.25)],
    }
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def flat_params(trainer: Trainer) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(trainer.trainable)}


def test_loss_falls_when_overfitting(tmp_path):
    c = loop_config(tmp_path, num_steps=40, checkpoint_every=1000)
    trainer = loop_trainer(c, tmp_path / "run")
    trainer.run()
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert scalars["loss"] == [(r["step"], pytest.approx(r["loss"])) for r in records]
    assert set(scalars) == set(records[0]) - {"step"}
    first, last = records[0], np.mean([r["loss"] for r in records[-5:]])
    assert last < 0.6 * first["loss"], (first, last)
    assert np.mean([r["lm_loss"] for r in records[-5:]]) < first["lm_loss"]
    assert np.mean([r["diff_loss"] for r in records[-5:]]) < first["diff_loss"]
    trainer.close()


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    def config(checkpoint_every):
        c = loop_config(tmp_path, 7, checkpoint_every)
        # bf16 weights: the trained head takes stochastically rounded updates (the default),
        # whose random bits must come back with the checkpoint as dropout's do.
        c.model.param_dtype = "bfloat16"
        assert c.model.low_precision_update == "stochastic"
        return c

    straight = loop_trainer(config(1000), tmp_path / "straight")
    straight.run()
    killed = loop_trainer(config(3), tmp_path / "killed")
    killed.run(until=5)  # checkpoints at 3; steps 4-5 are lost as in a kill
    killed.checkpointer.wait()
    resumed = loop_trainer(config(3), tmp_path / "killed")
    assert resumed.step == 3
    resumed.run()
    a, b = flat_params(straight), flat_params(resumed)
    assert a[("backbone", "lm_head", "kernel")].dtype == jnp.bfloat16
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))
    opt_a, opt_b = jax.tree.leaves(straight.opt_state), jax.tree.leaves(resumed.opt_state)
    for x, y in zip(opt_a, opt_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    for t in (straight, killed, resumed):
        t.close()


def test_a_float32_master_is_sharded_saved_and_restored_with_the_optimizer(tmp_path):
    def config():
        c = loop_config(tmp_path, 3, 2)
        c.model.param_dtype, c.model.low_precision_update = "bfloat16", "float32_master"
        return c

    def master(trainer):
        return trainer.opt_state.master["backbone"]["lm_head"]["kernel"][...]

    first = loop_trainer(config(), tmp_path / "run")
    head = first.trainable["backbone"]["lm_head"]["kernel"][...]
    assert head.dtype == jnp.bfloat16 and master(first).dtype == jnp.float32
    assert master(first).sharding.is_equivalent_to(head.sharding, 2)
    first.run(2)  # saves step 2
    first.checkpointer.wait()
    saved = np.asarray(master(first))
    first.close()
    resumed = loop_trainer(config(), tmp_path / "run")
    assert resumed.step == 2
    np.testing.assert_array_equal(np.asarray(master(resumed)), saved)
    resumed.run()
    head = resumed.trainable["backbone"]["lm_head"]["kernel"][...]
    np.testing.assert_array_equal(np.asarray(head), np.asarray(master(resumed).astype(head.dtype)))
    resumed.close()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = loop_trainer(loop_config(tmp_path, 6, 2), tmp_path / "run")
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
    loop_trainer(loop_config(tmp_path, 1, 1000), tmp_path / "run").close()
    c = loop_config(tmp_path, 1, 1000)
    c.model.lora.rank = 4
    with pytest.raises(ValueError, match=r"--config\.model\.lora\.rank \(16 there, 4 now\)"):
        loop_trainer(c, tmp_path / "run")


def _train_cmd(workdir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"--workdir={workdir}", *overrides]


def test_train_py_default_runs_end_to_end_then_ctrl_c_saves(tmp_path):
    # As on a laptop: one CPU device, not the suite's 8 (the sharded path is tested above, and
    # train.py on a mesh by test_sharding); 8 virtual devices on a few cores also make each
    # step several times slower.
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS=subprocess_xla_flags())
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
        ("--config.num_steps=abc", "error: --config.num_steps: 'abc' is not an int"),
        (
            "--source=mine=tsv:/data/mine.tsv",
            "error: --source mine=tsv:/data/mine.tsv: FORMAT 'tsv' is not one of "
            "empathetic_dialogues, daily_dialog, esconv, j_daily_dialog, "
            "j_empathetic_dialogues, jsonl",
        ),
        (
            "--source=mine=jsonl:/no/such/mine.jsonl",
            "error: --config.data.sources.mine.path: /no/such/mine.jsonl: no such file or "
            "directory (format 'jsonl')",
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


def train_cli():
    """train.py as a module (its command line runs only under __main__)."""
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_source_adds_a_corpus_that_config_options_then_change(tmp_path):
    cli = train_cli()
    data = write_dialogues(tmp_path / "mine.jsonl")
    args = ["--config.num_steps", "3", "--source", f"mine=jsonl:{data}:0.5"]
    args += ["--config.data.sources.mine.split=valid", "--noconfig.model.lisendiff"]
    line = cli.check_command_line(args)
    assert line.config_file == ROOT / "configs" / "tiny.py"
    flag_values = flags.FlagValues()
    cli.define_flags(line, flag_values)
    flag_values(["train.py", *line.argv])  # what absl does with the command line
    config = flag_values.config
    assert config.data.sources.mine.to_dict() == dict(
        format="jsonl", path=str(data), fraction=0.5, split="valid"
    )
    assert "esconv" in config.data.sources  # added to the config's own corpora
    assert (config.num_steps, config.model.lisendiff) == (3, False)
    assert flag_values.source == [f"mine=jsonl:{data}:0.5"]
    validate(config)
    check_data_paths(config)
    with pytest.raises(ConfigError, match=r"^--config\.data\.sources\.other\.split: no such"):
        cli.check_command_line(["--config.data.sources.other.split=valid"])
    with pytest.raises(ConfigError, match=r"^--config\.num_steps: 'x' is not an int$"):
        cli.check_command_line(["--config.num_steps", "x"])
    with pytest.raises(ConfigError, match=r"^--noconfig\.num_steps: only a bool option"):
        cli.check_command_line(["--noconfig.num_steps"])


# -- the system prompt each training example is encoded with ------------------------------


def prompt_config(tmp_path: Path, train_prompt: str, langs=("ja", "en")):
    """The loop config on one dialogue per language in `langs`, each a distinct sentence."""
    c = loop_config(tmp_path, 1, 1000)
    path = tmp_path / "langs.jsonl"
    with open(path, "w") as f:
        for i, lang in enumerate(langs):
            turns = [{"speaker": "AB"[j % 2], "text": f"{lang} turn {j}"} for j in range(2)]
            f.write(json.dumps({"id": f"d{i}", "lang": lang, "style": "empathy", "turns": turns}))
            f.write("\n")
    c.data.sources.mine.path = str(path)
    c.data.train_prompt = train_prompt
    c.data.max_length = 256  # room for the longest prompt, so no turn is cut
    return c


class _Stop(Exception):
    pass


def trainer_encodings(monkeypatch, config, workdir) -> dict[str, str]:
    """{example language: its encoded chat as text}, as the Trainer encodes them; stopped
    right after encoding, before the S-Encoder and the weights."""
    seen = {}

    def encode_examples(tokenizer, examples, system, max_length, progress):
        encoded = formatting.encode_examples(tokenizer, examples, system, max_length, progress)
        for example, chat in zip(examples, encoded, strict=True):
            seen[example.lang] = tokenizer.decode(chat.input_ids)
        raise _Stop

    monkeypatch.setattr(loop, "encode_examples", encode_examples)
    with pytest.raises(_Stop):
        loop_trainer(config, workdir)
    return seen


def test_each_training_example_gets_its_own_languages_prompt(tmp_path, monkeypatch):
    chats = trainer_encodings(monkeypatch, prompt_config(tmp_path, "example"), tmp_path / "w")
    assert set(chats) == {"ja", "en"}
    for lang, text in chats.items():
        others = [p for other, p in SYSTEM_PROMPTS.items() if other != lang]
        assert SYSTEM_PROMPTS[lang] in text and not any(p in text for p in others), text
        assert f"{lang} turn 1<|eot_id|>" in text


def test_target_and_none_training_prompts(tmp_path, monkeypatch):
    chats = trainer_encodings(monkeypatch, prompt_config(tmp_path, "target"), tmp_path / "t")
    assert set(chats) == {"ja", "en"}
    assert all(SYSTEM_PROMPTS["zh"] in text for text in chats.values())
    assert not any(SYSTEM_PROMPTS[lang] in chats[lang] for lang in ("ja", "en"))
    chats = trainer_encodings(monkeypatch, prompt_config(tmp_path, "none"), tmp_path / "n")
    assert set(chats) == {"ja", "en"}
    for text in chats.values():
        assert "system" not in text and not any(p in text for p in SYSTEM_PROMPTS.values())
        assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")


def test_a_language_without_a_prompt_stops_before_encoding_or_weights(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("reached past the language check")

    for name in ("encode_examples", "make_encoder", "load_backbone"):
        monkeypatch.setattr(loop, name, never)
    config = prompt_config(tmp_path, "example", langs=("en", "fr"))
    with pytest.raises(ConfigError) as error:
        loop_trainer(config, tmp_path / "w")
    assert str(error.value) == (
        "--config.data.sources.mine: language 'fr' (French) has no system prompt (have en, ja, "
        "yue, zh); give one in a JSON file of language -> prompt with "
        "--config.data.prompts=FILE, or set --config.data.train_prompt=target or none"
    )


def test_a_max_length_shorter_than_the_system_prompt_names_the_option(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("reached past encoding")

    for name in ("make_encoder", "load_backbone"):
        monkeypatch.setattr(loop, name, never)
    config = prompt_config(tmp_path, "example", langs=("en",))
    config.data.max_length = 16  # the English system prompt alone is longer
    with pytest.raises(ConfigError, match=r"^--config\.data\.max_length: max_length=16 leaves no"):
        loop_trainer(config, tmp_path / "w")


def test_a_target_prompt_longer_than_max_length_stops_training_before_it_starts(
    tmp_path, monkeypatch
):
    # Training without system prompts fits, but replies would be sampled with the target
    # language's prompt, which does not: the run must stop now, not after training.
    def never(*args, **kwargs):
        raise AssertionError("reached past encoding")

    for name in ("make_encoder", "load_backbone"):
        monkeypatch.setattr(loop, name, never)
    config = prompt_config(tmp_path, "none", langs=("en",))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"ko": "한국어로 답하세요. " * 100}))
    config.data.prompts, config.data.target_lang = str(prompts), "ko"
    config.data.max_length = 64
    with pytest.raises(ConfigError, match=r"^--config\.data\.max_length: max_length=64 leaves no"):
        loop_trainer(config, tmp_path / "w")


def test_a_workdir_from_before_train_prompt_resumes_only_with_target(tmp_path):
    config = loop_config(tmp_path, 1, 1000)
    saved = json.loads(config.to_json())
    del saved["data"]["train_prompt"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"train_prompt \('target' there, 'example' now\)"):
        _check_workdir_config(tmp_path, config)
    config.data.train_prompt = "target"
    _check_workdir_config(tmp_path, config)
