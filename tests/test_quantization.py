"""A qwix-quantized frozen backbone (model.base_quantization): close to float, loaded tensor by
tensor, frozen in training, resumed exactly, the same on a mesh, and restored, sampled and
exported from its workdir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from test_gguf import write_gguf
from test_sharding import plan
from tiny_checkpoints import make_checkpoint
from tiny_workdir import write_dialogues

from lisendiff_jax.backbone import load_backbone
from lisendiff_jax.backbone.layout import PROJECTIONS
from lisendiff_jax.backbone.loading import read_safetensors
from lisendiff_jax.backbone.quantized import (
    QuantizedLinear,
    QuantizedWeight,
    quantize_projections,
)
from lisendiff_jax.config import ConfigError, load_config, validate
from lisendiff_jax.export import export, load_exported
from lisendiff_jax.infer.inference import Listener, Options, Request
from lisendiff_jax.infer.restore import load_workdir
from lisendiff_jax.method.lora import LoRALinear
from lisendiff_jax.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
IDS = jnp.asarray(np.random.RandomState(0).randint(3, 128, (2, 16)), jnp.int32)
# Relative L2 error of the tiny Qwen2's logits (3 layers of random N(0, 0.08^2) weights, 64
# wide) against float. Rounding to a uniform grid of step s errs by s / sqrt(12) RMS; int8's
# per-channel step is absmax / 127.5, so each weight is off by ~0.6% of its column's RMS and
# the logits, through three layers, by ~1.4% (measured): 3% leaves room. nf4's 16 levels per
# block of 64 err by ~9% per weight (QLoRA's figure for normal weights) and the logits by
# ~26% (measured): 40%. Each also bounds the weights' own error, which does not compound.
LOGIT_TOLERANCE = {"int8": 0.03, "nf4": 0.40}
WEIGHT_TOLERANCE = {"int8": 0.01, "nf4": 0.12}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen2")
    make_checkpoint("qwen2_bias", folder)  # biases on q/k/v: they stay float
    return folder


def _projections(decoder):
    return [
        getattr(getattr(layer, block), name)
        for layer in decoder.layers
        for name, (block, *_) in PROJECTIONS.items()
    ]


@pytest.mark.parametrize("quantization", ["int8", "int4", "nf4"])
def test_loading_quantizes_as_quantizing_the_float_model_does(checkpoint, quantization):
    float_model = load_backbone(checkpoint)
    loaded = load_backbone(checkpoint, quantization=quantization)
    # No float kernel of a projection remains, and the quantized pieces are no parameters.
    projections = _projections(loaded)
    assert all(isinstance(p, QuantizedLinear) for p in projections)
    params = nnx.to_flat_state(nnx.state(loaded, nnx.Param))
    assert not [path for path, _ in params if path[-1] == "kernel" and path[0] == "layers"]
    assert {type(v) for _, v in nnx.to_flat_state(nnx.state(loaded, QuantizedWeight))} == {
        QuantizedWeight
    }
    # Tensor-by-tensor loading gives the numbers of quantizing the float-loaded model.
    quantized = quantize_projections(load_backbone(checkpoint), quantization)
    for a, b in zip(projections, _projections(quantized), strict=True):
        np.testing.assert_array_equal(np.asarray(a.qvalue[...]), np.asarray(b.qvalue[...]))
        np.testing.assert_array_equal(np.asarray(a.scale[...]), np.asarray(b.scale[...]))
    np.testing.assert_array_equal(np.asarray(loaded(IDS)), np.asarray(quantized(IDS)))
    # Embeddings, norms, biases and the LM head are untouched.
    for name in ("embed_tokens", "norm", "lm_head"):
        for (_, x), (_, y) in zip(
            nnx.to_flat_state(nnx.state(getattr(loaded, name))),
            nnx.to_flat_state(nnx.state(getattr(float_model, name))),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]))
    bias = loaded.layers[0].self_attn.q_proj.bias[...]
    np.testing.assert_array_equal(bias, float_model.layers[0].self_attn.q_proj.bias[...])
    if quantization in LOGIT_TOLERANCE:
        for q, f in zip(projections, _projections(float_model), strict=True):
            assert _rel(q.float_kernel(), f.kernel[...]) < WEIGHT_TOLERANCE[quantization]
        error = _rel(loaded(IDS), float_model(IDS))
        assert 0 < error < LOGIT_TOLERANCE[quantization], error


def test_a_bad_quantization_is_named():
    c = load_config(ROOT / "configs" / "tiny.py")
    c.model.base_quantization = "int3"
    with pytest.raises(ConfigError, match="model.base_quantization: 'int3' is not one of"):
        validate(c)


# -- training, resuming, a mesh, restore / sample / export ----------------------------------
# One trained workdir serves every test below, and only two train steps are ever compiled
# (one device, the 2 x 4 mesh). The runs are LoRA-only (the BaseLLM+L2 twin): the LisenDiff
# modules are float and trained whatever the base, and without them a step compiles in half
# the time.


def _config(data: Path):
    c = load_config(ROOT / "configs" / "tiny.py")
    for name in list(c.data.sources):
        del c.data.sources[name]
    c.data.sources.mine = dict(format="jsonl", path=str(data), fraction=1.0, split="")
    c.data.max_length = 96
    c.num_steps, c.checkpoint_every, c.log_every = 2, 1, 1
    c.learning_rate, c.warmup_steps = 3e-3, 0
    c.model.base_quantization = "nf4"
    c.model.param_dtype = "bfloat16"  # what the export then writes
    c.model.lisendiff = False
    return c


def _quantized(trainer: Trainer) -> dict:
    state = nnx.state(nnx.merge(trainer.graphdef, trainer.trainable, *trainer.frozen))
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(state, QuantizedWeight))}


def _trainable(trainer: Trainer) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(trainer.trainable)}


def _metrics(workdir: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two steps on one device from an nf4 base, checkpointed at 1 and 2: the workdir, the
    trainer's numbers before and after, and its compiled step."""
    root = tmp_path_factory.mktemp("quantized_run")
    data = write_dialogues(root / "d.jsonl")
    trainer = Trainer(_config(data), root / "run", progress=False, mesh=plan((1, 1, 1)))
    before = (_trainable(trainer), _quantized(trainer))
    params = nnx.state(nnx.merge(trainer.graphdef, trainer.trainable, *trainer.frozen), nnx.Param)
    trainer.run()
    trainer.close()
    return dict(
        data=data,
        workdir=root / "run",
        before=before,
        after=(_trainable(trainer), _quantized(trainer)),
        losses=_metrics(root / "run", "loss"),
        param_paths={path for path, _ in nnx.to_flat_state(params)},
        step_fn=trainer._step_fn,
    )


def test_training_moves_only_trainable_parameters_and_saves_no_quantized_weight(run):
    (trainable0, quantized0), (trainable1, quantized1) = run["before"], run["after"]
    assert len(quantized0) == 4 * 2 * len(PROJECTIONS)  # qvalue and scale, 7 a layer, 4 layers
    assert not set(quantized0) & set(trainable0)  # no quantized piece trains
    # Nor is any a parameter: what selects nnx.Param (an export, a count) never sees them.
    assert not set(quantized0) & run["param_paths"]
    for path in quantized0:
        np.testing.assert_array_equal(quantized1[path], quantized0[path], err_msg=str(path))
    moved = [p for p in trainable0 if not np.array_equal(trainable0[p], trainable1[p])]
    assert any("lora_b" in p for p in moved) and any("lm_head" in p for p in moved)
    files = [f.name for f in (run["workdir"] / "2").rglob("*")]
    assert not any("qvalue" in name for name in files)
    meta = (run["workdir"] / "2" / "state" / "_METADATA").read_text()
    assert "qvalue" not in meta and "lora_b" in meta
    # The step's outputs go back in as its inputs with the same types: compiled once.
    assert run["step_fn"]._cache_size() == 1


def test_resume_after_a_kill_is_exact_on_a_quantized_base(run, tmp_path):
    # The run killed after step 2 but before saving it: it resumes from step 1.
    shutil.copytree(run["workdir"], tmp_path / "killed")
    shutil.rmtree(tmp_path / "killed" / "2")
    resumed = Trainer(
        _config(run["data"]), tmp_path / "killed", progress=False, mesh=plan((1, 1, 1))
    )
    assert resumed.step == 1
    # The backbone is quantized again as it loads (nothing quantized was saved): the same
    # numbers as the run's.
    for path, expected in run["before"][1].items():
        np.testing.assert_array_equal(_quantized(resumed)[path], expected, err_msg=str(path))
    # The run's compiled step (same model, config and placement): only the restore is new.
    resumed._step_fn = run["step_fn"]
    resumed.run()
    expected, actual = run["after"][0], _trainable(resumed)
    assert actual.keys() == expected.keys()
    for path in expected:
        np.testing.assert_array_equal(actual[path], expected[path], err_msg=str(path))
    resumed.close()


def test_a_quantized_base_on_a_2x4_mesh_equals_one_device(run, tmp_path):
    trainer = Trainer(_config(run["data"]), tmp_path / "run", progress=False, mesh=plan((2, 4, 1)))
    # Quantized where the shards are: the very same qvalues and scales as on one device.
    quantized = _quantized(trainer)
    for path, expected in run["before"][1].items():
        np.testing.assert_array_equal(quantized[path], expected, err_msg=str(path))
    up = trainer.frozen[2]["backbone"]["layers"][0]["mlp"]["up_proj"]
    assert up["qvalue"][...].sharding.spec == P("fsdp", "tensor")  # [128, 352], as the kernel
    assert up["qvalue"][...].addressable_shards[0].data.shape == (32, 352)
    # The scale [128 / 64 = 2, 352]: its 2 rows do not split 4 ways, so they are replicated.
    assert up["scale"][...].sharding.spec == P(None, "tensor")
    trainer.run()
    np.testing.assert_allclose(_metrics(tmp_path / "run", "loss"), run["losses"], rtol=1e-5)
    for path, expected in run["after"][0].items():
        np.testing.assert_allclose(
            _trainable(trainer)[path], expected, rtol=2e-2, atol=1e-4, err_msg=str(path)
        )
    trainer.close()


# Relative L2 error of the quantized workdir's logits (W de-quantized in float32, LoRA added
# unmerged) against its export's (W + LoRA merged and rounded to bf16 once). bf16 keeps 8
# significant bits, a relative rounding error of at most 2^-9 (0.2%) per weight, about 0.1% RMS;
# through 4 layers the logits moved by 0.33% (measured): 1% leaves room.
EXPORT_LOGIT_TOLERANCE = 0.01


def test_a_quantized_workdir_samples_quantized_and_exports_merged(run, tmp_path):
    model, config, tokenizer = load_workdir(run["workdir"])
    # Kept quantized, the adapters unmerged on top: no float kernel of a projection is held.
    projections = _projections(model.backbone)
    assert all(isinstance(getattr(p, "base", p), QuantizedLinear) for p in projections)
    assert any(isinstance(p, LoRALinear) for p in projections)
    params = nnx.to_flat_state(nnx.state(model.backbone, nnx.Param))
    assert not [path for path, _ in params if path[-1] == "kernel" and "base" in path]
    # Quantized again as training did: the same numbers.
    restored = {
        p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, QuantizedWeight))
    }
    for path, expected in run["before"][1].items():
        np.testing.assert_array_equal(restored[path], expected, err_msg=str(path))

    out = export(run["workdir"], tmp_path / "export")
    tensors = dict(read_safetensors(out / "model.safetensors"))
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == jnp.bfloat16
    assert len([n for n in tensors if n.endswith("proj.weight")]) == 4 * len(PROJECTIONS)
    exported, _, _ = load_exported(out)
    assert not any(isinstance(p, QuantizedLinear) for p in _projections(exported.backbone))
    error = _rel(model.backbone(IDS), exported.backbone(IDS))
    assert 0 < error < EXPORT_LOGIT_TOLERANCE, error

    requests = [Request(("My cat is sick.", "I'm sorry.")), Request(("Is it late?",), lang="yue")]
    replies = Listener(model, config, tokenizer).reply(requests, Options(seed=3, max_tokens=6))
    assert len(replies) == 2 and all(isinstance(r.text, str) for r in replies)


def test_a_gguf_backbone_loads_quantized(tmp_path):
    path = write_gguf("llama_gqa", tmp_path / "model.gguf", "Q8_0")
    loaded = load_backbone(path, quantization="int8")
    assert all(isinstance(p, QuantizedLinear) for p in _projections(loaded))
    quantized = quantize_projections(load_backbone(path), "int8")
    for a, b in zip(_projections(loaded), _projections(quantized), strict=True):
        np.testing.assert_array_equal(np.asarray(a.qvalue[...]), np.asarray(b.qvalue[...]))
        np.testing.assert_array_equal(np.asarray(a.scale[...]), np.asarray(b.scale[...]))
