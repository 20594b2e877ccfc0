"""Training on a device mesh: the 8 virtual CPU devices of conftest.py stand in for GPUs.

A step on any mesh must equal the step on one device (to float tolerance), parameters must
really be split (their shardings and shard shapes are checked, not only the numbers), a
checkpoint written on one mesh must restore on another, and two processes must train as one.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from tiny_workdir import write_dialogues

from lisendiff_jax.backbone import load_backbone
from lisendiff_jax.config import ConfigError, load_config
from lisendiff_jax.infer.inference import InputError, latent_sampler
from lisendiff_jax.method.model import LisenDiff, training_loss
from lisendiff_jax.method.sampler import make_plan
from lisendiff_jax.sharding import (
    MeshError,
    MeshPlan,
    initialize_distributed,
    logical_axes,
    parse_rules,
    shard_fn,
)
from lisendiff_jax.tiny import backbone_folder
from lisendiff_jax.train.loop import Trainer
from lisendiff_jax.train.step import make_train_step

ROOT = Path(__file__).resolve().parents[1]
MESHES = {"2x4": (2, 4, 1), "1x8": (1, 8, 1), "1x2x4": (1, 2, 4)}


def test_the_suite_sees_eight_devices():
    assert jax.device_count() == 8, "conftest.py must set XLA_FLAGS before JAX starts"


def plan(shape) -> MeshPlan:
    return MeshPlan.create(shape, devices=jax.devices()[: int(np.prod(shape))])


def subprocess_xla_flags(devices: int = 1) -> str:
    """XLA_FLAGS for a train.py process the test starts: the suite's (conftest.py), with
    `devices` CPU devices instead of its 8."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)


def run_config(data: Path, num_steps: int = 3, checkpoint_every: int = 1000):
    """The embedded default on four dialogues (8 examples, one batch of 8), dropout on."""
    c = load_config(ROOT / "configs" / "tiny.py")
    for name in list(c.data.sources):
        del c.data.sources[name]
    c.data.sources.mine = dict(format="jsonl", path=str(data), fraction=1.0, split="")
    c.data.max_length = 96
    c.num_steps, c.checkpoint_every, c.log_every = num_steps, checkpoint_every, 1
    c.warmup_steps = 0
    return c


def host_params(trainer: Trainer) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(trainer.trainable)}


def metrics(workdir: Path, key: str) -> list[float]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)[key] for line in lines]


def keep_gradients() -> optax.GradientTransformation:
    """An "optimizer" whose state is the last gradient and whose update is zero."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads),
    )


def gradients(trainer: Trainer) -> dict:
    """The gradient of the first batch's loss at the trainer's current parameters, as the
    trainer's sharded train step computes it."""
    tx = keep_gradients()
    shardings = trainer.mesh.step_shardings(
        trainer.trainable, trainer.frozen, tx.init(trainer.trainable), trainer.config.batch_size
    )
    # Its update is zero, so it lands the same in every mode; "nearest" needs no Adam state.
    step = make_train_step(
        tx, functools.partial(training_loss, trainer.graphdef), shardings, "nearest"
    )
    params = jax.tree.map(jnp.copy, trainer.trainable)  # the step donates its input
    batch, _, _ = next(trainer.batches())
    with trainer.mesh.active():
        _, grads, _ = step(params, trainer.frozen, tx.init(params), batch, trainer.base_key)
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}


def assert_same_numbers(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(actual[path], expected[path], err_msg=str(path))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dialogues(tmp_path_factory.mktemp("sharding") / "d.jsonl")


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict:
    """One device: the first gradient, then three Adam steps' losses and gradient norms."""
    workdir = tmp_path_factory.mktemp("one_device")
    trainer = Trainer(run_config(data), workdir, progress=False, mesh=plan((1, 1, 1)))
    grads = gradients(trainer)
    trainer.run(3)
    trainer.close()
    return {
        "gradients": grads,
        "loss": metrics(workdir, "loss"),
        "grad_norm": metrics(workdir, "grad_norm"),
        "params": host_params(trainer),
    }


def assert_same_run(workdir: Path, reference: dict, steps: int) -> None:
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics(workdir, key), reference[key][:steps], rtol=1e-5)


# -- the rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, ndim, expected",
    [
        ("backbone.layers.3.self_attn.q_proj.base.kernel", 2, ("embed", "heads")),
        ("backbone.layers.3.self_attn.q_proj.lora_a", 2, ("embed", "lora")),
        ("backbone.layers.3.self_attn.v_proj.lora_b", 2, ("lora", "heads")),
        ("layers.0.self_attn.o_proj.kernel", 2, ("heads", "embed")),
        ("layers.0.self_attn.k_proj.bias", 1, ("heads",)),
        ("layers.0.mlp.down_proj.kernel", 2, ("mlp", "embed")),
        ("backbone.layers.1.cross_attn.attn.k_proj.kernel", 2, ("latent", "heads")),
        ("backbone.layers.1.cross_attn.attn.q_proj.kernel", 2, ("embed", "heads")),
        ("embed_tokens.embedding", 2, ("vocab", "embed")),
        ("backbone.lm_head.kernel", 2, ("embed", "vocab")),
        # An Adam moment's path ends with its parameter's.
        ("1.0.mu.backbone.lm_head.kernel", 2, ("embed", "vocab")),
        ("denoisers.stacked.blocks.0.attn.q_proj.kernel", 3, (None, None, None)),
        ("summary.blocks.0.mlp.fc_in.kernel", 2, (None, None)),
        ("backbone.norm.scale", 1, (None,)),
        ("0.count", 0, ()),
    ],
)
def test_logical_axes_come_from_the_parameter_path(path, ndim, expected):
    assert logical_axes(path, ndim) == expected


def test_specs_follow_the_rules_and_replicate_what_does_not_divide():
    p = plan((2, 2, 2))
    assert p.spec(("embed", "heads"), (64, 32)) == P("fsdp", "tensor")
    assert p.spec(("batch", None), (8, 5)) == P(("data", "fsdp"), None)
    assert p.spec(("vocab", "embed"), (33, 64)) == P(None, "fsdp")  # 33 rows: replicated
    assert p.batch_divisor == 4
    moved = MeshPlan(p.mesh, parse_rules(["vocab=fsdp", "embed="]))
    assert moved.spec(("vocab", "embed"), (64, 64)) == P("fsdp", None)
    # A mesh axis is used once per array: the second claimant is replicated.
    clash = MeshPlan(p.mesh, parse_rules(["vocab=fsdp"]))
    assert clash.spec(("vocab", "embed"), (64, 64)) == P("fsdp", None)


@pytest.mark.parametrize(
    "shape, message",
    [((3, -1, 1), "8 devices do not split"), ((2, 2, 1), "= 4, but 8 devices"), ((0, 1, 1), "")],
)
def test_a_mesh_that_does_not_fit_the_devices_is_named(shape, message):
    with pytest.raises(MeshError, match=r"--config\.mesh: .*" + message):
        MeshPlan.create(shape)


def test_bad_rules_and_batch_sizes_are_named(data, tmp_path):
    with pytest.raises(MeshError, match=r"--config\.mesh\.rules: 'embed=model'"):
        parse_rules(["embed=model"])
    c = run_config(data)
    c.batch_size = 6
    with pytest.raises(ConfigError, match=r"--config\.batch_size: 6 rows .* 8 data-parallel"):
        Trainer(c, tmp_path / "run", progress=False)


def test_distributed_environment_must_be_complete():
    with pytest.raises(MeshError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID as well"):
        initialize_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert initialize_distributed({}) is False  # one process: nothing to start


# -- loading and training on a mesh ---------------------------------------------------------


def test_backbone_loads_straight_into_its_shards():
    folder = backbone_folder("tiny")
    p = plan((1, 2, 4))
    sharded = load_backbone(folder, sharding=shard_fn(p))
    table = sharded.embed_tokens.embedding[...]  # [vocab, hidden]
    assert table.sharding.spec == P("tensor", "fsdp")
    assert table.addressable_shards[0].data.shape == (table.shape[0] // 4, table.shape[1] // 2)
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 500, (2, 9)), jnp.int32)
    np.testing.assert_allclose(
        np.asarray(sharded(ids)), np.asarray(load_backbone(folder)(ids)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("mesh", ["2x4", "1x8", "1x2x4"])
def test_training_on_a_mesh_equals_one_device(mesh, data, reference, tmp_path):
    shape = MESHES[mesh]
    trainer = Trainer(run_config(data), tmp_path / "run", progress=False, mesh=plan(shape))

    # The sharded step's gradient equals one device's, element by element.
    grads = gradients(trainer)
    for path, expected in reference["gradients"].items():
        scale = np.abs(expected).max()
        np.testing.assert_allclose(grads[path], expected, rtol=1e-4, atol=1e-5 * scale)

    # Three Adam steps: the same losses and gradient norms at every step. Parameters are
    # compared element by element too, but Adam's first non-zero step moves each weight by
    # lr * sign(gradient) whatever the gradient's size, so a weight whose gradient is ~0 (the
    # cross-attention's v_proj at step 2, behind its zero-initialised output) may go either way
    # on rounding noise: at most one in 10^4 elements may differ, and by no more than a full
    # step each way at every step.
    trainer.run(3)
    assert_same_run(tmp_path / "run", reference, 3)
    lr = trainer.config.learning_rate
    for path, expected in reference["params"].items():
        diff = np.abs(host_params(trainer)[path] - expected)
        assert np.mean(diff > 5e-4) <= 1e-4, (path, int(np.sum(diff > 5e-4)))
        assert diff.max() <= 2 * 3 * lr, (path, float(diff.max()))

    # Really split: shardings and the shapes each device holds.
    fsdp, tensor = shape[1], shape[2]
    head = trainer.trainable["backbone"]["lm_head"]["kernel"][...]  # [hidden, vocab], trained
    assert head.sharding.spec == P("fsdp", "tensor")
    assert head.addressable_shards[0].data.shape == (128 // fsdp, head.shape[1] // tensor)
    lora_a = trainer.trainable["backbone"]["layers"][0]["self_attn"]["q_proj"]["lora_a"][...]
    assert lora_a.addressable_shards[0].data.shape == (128 // fsdp, 16)
    frozen = trainer.frozen[2]["backbone"]["layers"][0]["mlp"]["up_proj"]["kernel"][...]
    assert frozen.sharding.spec == P("fsdp", "tensor")
    assert frozen.addressable_shards[0].data.shape == (128 // fsdp, 352 // tensor)
    moments = [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(trainer.opt_state)[0]
        if "lm_head" in jax.tree_util.keystr(path)
    ]
    assert len(moments) == 2  # Adam's mu and nu, split like the head itself
    assert all(m.sharding.is_equivalent_to(head.sharding, 2) for m in moments)
    batch, _, _ = next(trainer.batches())
    rows = batch["input_ids"]
    assert rows.sharding.spec == P(("data", "fsdp"), None)
    assert rows.addressable_shards[0].data.shape[0] == 8 // (shape[0] * fsdp)
    trainer.close()


def test_a_checkpoint_written_on_one_mesh_restores_on_another(data, reference, tmp_path):
    workdir = tmp_path / "run"
    first = Trainer(run_config(data, checkpoint_every=2), workdir, False, mesh=plan((2, 4, 1)))
    first.run(2)  # saves step 2
    saved = host_params(first)
    first.close()

    second = Trainer(run_config(data, checkpoint_every=2), workdir, False, mesh=plan((1, 8, 1)))
    assert second.step == 2
    head = second.trainable["backbone"]["lm_head"]["kernel"][...]
    assert head.sharding.mesh.shape == {"data": 1, "fsdp": 8, "tensor": 1}
    assert head.addressable_shards[0].data.shape == (16, head.shape[1])
    assert_same_numbers(host_params(second), saved)
    second.run(3)  # and goes on as the one-device run did
    assert_same_run(workdir, reference, 3)
    second.save()
    resumed = host_params(second)
    second.close()

    third = Trainer(run_config(data, checkpoint_every=2), workdir, False, mesh=plan((1, 1, 1)))
    assert third.step == 3
    assert len(third.trainable["backbone"]["lm_head"]["kernel"][...].devices()) == 1
    assert_same_numbers(host_params(third), resumed)
    third.close()


def test_the_sampler_on_a_mesh_equals_one_device():
    c = load_config(ROOT / "configs" / "tiny.py")
    model = LisenDiff(load_backbone(backbone_folder("tiny")), c.model, 512, rngs=nnx.Rngs(0))
    diffusion = make_plan(model.diffusion.make(), "ddim", 10, eta=1.0)
    rng = np.random.RandomState(0)
    inputs = (
        rng.randn(16, 4, 512).astype(np.float32),  # context [batch, n_ctx, d]
        rng.rand(16, 4) < 0.8,
        np.arange(16) % 2,
        jax.random.split(jax.random.key(0), 16),
    )
    expected, expected_trace = latent_sampler(model, diffusion, return_trajectory=True)(*inputs)
    for shape in [(2, 4, 1), (1, 8, 1)]:
        sample = latent_sampler(model, diffusion, plan(shape), return_trajectory=True)
        latents, trace = sample(*inputs)
        assert latents.sharding.spec == P(("data", "fsdp"))
        assert latents.addressable_shards[0].data.shape == (2, 1, 512)  # 16 rows / 8 devices
        assert trace.addressable_shards[0].data.shape == (10, 2, 1, 512)
        np.testing.assert_allclose(np.asarray(latents), np.asarray(expected), atol=2e-5)
        np.testing.assert_allclose(np.asarray(trace), np.asarray(expected_trace), atol=2e-5)
    with pytest.raises(InputError, match="12 rows do not split over the mesh's 8"):
        sample(*(x[:12] for x in inputs))


# -- two processes, one per "host" -----------------------------------------------------------

CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from test_sharding import run_config


def get_config():
    c = run_config({data!r}, num_steps=2, checkpoint_every=2)
    c.mesh.data, c.mesh.fsdp = 1, 8  # every weight split across both processes
    return c
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_as_one(data, reference, tmp_path):
    """train.py on two processes of 4 devices each, joined by jax.distributed through the
    environment variables of the README, on a 1 x 8 mesh (every weight split across the two
    processes, each feeding 4 of the 8 rows) trains as one device does."""
    config = tmp_path / "two_hosts.py"
    config.write_text(CONFIG_FILE.format(tests=str(ROOT / "tests"), data=str(data)))
    workdir = tmp_path / "run"
    port = free_port()
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS=subprocess_xla_flags(4),
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
        )
        cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(config)]
        cmd += ["--workdir", str(workdir)]
        procs.append(
            subprocess.Popen(
                cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    for line in ("data mix", "checkpoint: "):  # process 0 reports
        assert line in outputs[0] and line not in outputs[1]
    assert_same_run(workdir, reference, 2)  # one metrics line per step: process 0 logs
    restored = Trainer(run_config(data), workdir, progress=False, mesh=plan((1, 1, 1)))
    assert restored.step == 2
    restored.close()
