"""LoRA adapters: exact start, the closed form, merging, dropout modes, target validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_checkpoints import make_checkpoint

from lisendiff_jax.backbone import load_backbone
from lisendiff_jax.backbone.layout import PROJECTIONS
from lisendiff_jax.method.lora import LoRALinear, apply_lora, merge_lora

IDS = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 10)), jnp.int32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_bias")
    make_checkpoint("qwen2_bias", folder)  # biases on q/k/v: the base path keeps them
    return folder


def randomise_b(model: nnx.Module, seed: int = 0) -> None:
    rng = np.random.RandomState(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if path[-1] == "lora_b":
            var.set_value(jnp.asarray(0.1 * rng.randn(*var.shape), var.dtype))


def param_paths(model: nnx.Module, *filters) -> set[str]:
    return {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, *filters))}


def test_zero_b_gives_the_backbone_exactly(folder):
    model = load_backbone(folder)
    reference = np.asarray(model(IDS))
    apply_lora(model, targets=tuple(PROJECTIONS), rank=4, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(model(IDS)), reference)

    lora = param_paths(model, nnx.LoRAParam)
    assert len(lora) == 2 * len(PROJECTIONS) * 3
    assert "layers.0.self_attn.q_proj.lora_a" in lora
    frozen = param_paths(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    assert {"layers.0.self_attn.q_proj.base.kernel", "layers.0.self_attn.q_proj.base.bias"} <= (
        frozen
    )
    assert not lora & frozen


def test_lora_linear_matches_closed_form():
    base = nnx.Linear(16, 24, rngs=nnx.Rngs(0))
    lora = LoRALinear(base, rank=4, alpha=8.0, dropout=0.0, rngs=nnx.Rngs(1))
    a = np.asarray(lora.lora_a[...])
    assert np.all(np.abs(a) <= 1 / np.sqrt(16)) and np.abs(a).max() > 0.5 / np.sqrt(16)
    assert not np.any(np.asarray(lora.lora_b[...]))
    b = np.random.RandomState(0).randn(4, 24).astype(np.float32)
    lora.lora_b.set_value(jnp.asarray(b))
    x = np.random.RandomState(1).randn(2, 5, 16).astype(np.float32)
    expected = np.asarray(base(jnp.asarray(x))) + 2.0 * x @ a @ b
    np.testing.assert_allclose(lora(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def test_adapter_computes_in_the_base_dtype():
    base = nnx.Linear(8, 8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    lora = LoRALinear(base, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
    assert lora.lora_a[...].dtype == jnp.float32
    assert lora(jnp.ones((1, 8), jnp.bfloat16)).dtype == jnp.bfloat16


def test_merge_matches_unmerged_model(folder):
    model = load_backbone(folder)
    plain_paths = param_paths(model)
    targets = ("q_proj", "v_proj", "o_proj", "down_proj")
    apply_lora(model, targets=targets, rank=4, alpha=8.0, dropout=0.1, rngs=nnx.Rngs(0))
    randomise_b(model)
    adapted = np.asarray(model(IDS))
    assert not np.allclose(adapted, np.asarray(load_backbone(folder)(IDS)), atol=1e-3)

    assert merge_lora(model) is model
    assert param_paths(model) == plain_paths
    assert all(type(layer.self_attn.q_proj) is nnx.Linear for layer in model.layers)
    np.testing.assert_allclose(np.asarray(model(IDS)), adapted, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_train_mode():
    base = nnx.Linear(32, 32, rngs=nnx.Rngs(0))
    lora = LoRALinear(base, rank=4, alpha=8.0, dropout=0.5, rngs=nnx.Rngs(1))
    lora.lora_b.set_value(jax.random.normal(jax.random.key(2), (4, 32)))
    x = jax.random.normal(jax.random.key(3), (4, 32))
    evaluated = np.asarray(lora(x))
    np.testing.assert_array_equal(np.asarray(lora(x)), evaluated)  # starts in eval mode

    lora.train()
    first, second = np.asarray(lora(x)), np.asarray(lora(x))
    assert not np.allclose(first, evaluated) and not np.allclose(first, second)
    # Dropout sits on the adapter path only: with B = 0 training mode is the base exactly.
    lora.lora_b.set_value(jnp.zeros((4, 32)))
    np.testing.assert_array_equal(np.asarray(lora(x)), np.asarray(base(x)))

    lora.eval()
    np.testing.assert_array_equal(np.asarray(lora(x)), np.asarray(base(x)))


def test_model_train_and_eval_switch_every_adapter(folder):
    model = apply_lora(load_backbone(folder), dropout=0.5, rngs=nnx.Rngs(0))
    model.train()
    assert all(not layer.self_attn.v_proj.dropout.deterministic for layer in model.layers)
    model.eval()
    assert all(layer.self_attn.q_proj.dropout.deterministic for layer in model.layers)


def test_unknown_target_is_named_with_the_valid_ones(folder):
    model = load_backbone(folder)
    valid = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    with pytest.raises(ValueError, match=f"'qkv_proj'.*{valid}"):
        apply_lora(model, targets=("q_proj", "qkv_proj"), rngs=nnx.Rngs(0))
    apply_lora(model, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, rngs=nnx.Rngs(0))
