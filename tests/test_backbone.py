"""The backbone against transformers' PyTorch models, our ground truth."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny_checkpoints import KINDS, make_checkpoint

from lisendiff_jax.backbone import (
    BackboneConfig,
    BackboneConfigError,
    CheckpointError,
    load_backbone,
)
from lisendiff_jax.backbone.generate import SamplingParams, generate

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(KINDS))
def pair(request, tmp_path_factory):
    """(kind, folder, transformers model, our fp32 model) for each tiny architecture."""
    folder = tmp_path_factory.mktemp(request.param)
    torch_model = make_checkpoint(request.param, folder)
    return request.param, folder, torch_model, load_backbone(folder, dtype="float32")


def torch_logits(model, ids, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


def left_padded_batch(rng, lengths, total, vocab):
    ids = rng.randint(3, vocab, (len(lengths), total))
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
    return np.where(mask == 1, ids, 0), mask


@pytest.mark.parametrize("length", [1, 7, 33, 100])
def test_logits_match_transformers(pair, length):
    _, _, torch_model, ours = pair
    ids = np.random.RandomState(length).randint(0, 128, (2, length))
    ref = torch_logits(torch_model, ids)
    out = np.asarray(ours(jnp.asarray(ids, jnp.int32)))
    assert out.dtype == np.float32 and out.shape == ref.shape == (2, length, 128)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)


def test_padded_batch_matches_transformers(pair):
    _, _, torch_model, ours = pair
    ids, mask = left_padded_batch(np.random.RandomState(1), [20, 13, 5, 1], 20, 128)
    ref = torch_logits(torch_model, ids, mask)
    out = np.asarray(ours(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=ATOL, rtol=0)


def test_greedy_generation_is_token_identical(pair):
    _, _, torch_model, ours = pair
    ids, mask = left_padded_batch(np.random.RandomState(2), [9, 4, 6], 9, 128)
    with torch.no_grad():
        ref = torch_model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        ).numpy()[:, ids.shape[1] :]
    params = SamplingParams(max_new_tokens=16, eos_token_ids=(2,), pad_token_id=0)
    out = generate(ours, ids, mask, params=params)
    tokens = np.asarray(out.tokens)[:, : ref.shape[1]]
    np.testing.assert_array_equal(tokens, ref)


def test_xla_attention_kernel_equals_the_einsum_reference(pair):
    """jax.nn.dot_product_attention's XLA path, the call the cuDNN kernel gets on a GPU, on a
    left-padded batch (padded rows too); a KV cache still decodes with the setting on."""
    _, _, _, ours = pair
    ids, mask = left_padded_batch(np.random.RandomState(4), [16, 9, 1], 16, 128)
    args = (jnp.asarray(ids, jnp.int32), jnp.asarray(mask))
    reference = np.asarray(ours(*args))
    ours.attention = "xla"
    try:
        out = np.asarray(ours(*args))
        cached, _ = ours.forward(*args, cache=ours.init_cache(3, 16))
    finally:
        ours.attention = "auto"
    np.testing.assert_allclose(out, reference, atol=1e-5, rtol=0)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(cached)[real], reference[real], atol=1e-5, rtol=0)


def test_auto_attention_takes_cudnn_only_where_its_probe_runs(monkeypatch):
    from lisendiff_jax.backbone import model as backbone_model

    assert backbone_model.attention_kernel("auto", jnp.bfloat16, 64) == "einsum"  # on a CPU
    with pytest.raises(ValueError, match="NVIDIA GPU"):
        backbone_model.attention_kernel("cudnn", jnp.bfloat16, 64)
    # Pretend to be a CUDA device: "auto" follows the probe, which really runs (and on this
    # CPU really fails to run cuDNN, so "auto" falls back instead of failing later).
    device = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200")
    monkeypatch.setattr(backbone_model.jax, "devices", lambda: [device])
    probe = backbone_model._cudnn_runs
    probe.cache_clear()
    try:
        assert backbone_model.attention_kernel("auto", jnp.bfloat16, 64) == "einsum"
        assert backbone_model.attention_kernel("auto", jnp.float32, 64) == "einsum"
        monkeypatch.setattr(backbone_model, "_cudnn_runs", lambda dtype: True)
        assert backbone_model.attention_kernel("auto", jnp.bfloat16, 64) == "cudnn"
        assert backbone_model.attention_kernel("auto", jnp.float32, 64) == "einsum"
        # cuDNN refuses to differentiate masked attention over an odd length.
        assert backbone_model.attention_kernel("auto", jnp.bfloat16, 63) == "einsum"
    finally:
        probe.cache_clear()  # the CPU's answer was cached under the pretended device


def test_the_mesh_compiled_for_decides_whether_cudnn_applies(monkeypatch):
    """Compiling ahead of time for a GPU topology on a machine without it (memory_budget.py
    --target): the mesh set with jax.set_mesh holds that GPU's devices, and they, not the
    default device, decide whether "cudnn" applies."""
    from lisendiff_jax.backbone import model as backbone_model

    with jax.set_mesh(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])):
        assert not backbone_model._on_cuda()
    for kind, cuda in (("NVIDIA H200", True), ("AMD Instinct MI300X", False)):
        device = types.SimpleNamespace(platform="gpu", device_kind=kind)
        mesh = types.SimpleNamespace(empty=False, abstract_device=device)
        monkeypatch.setattr(backbone_model.jax.sharding, "get_abstract_mesh", lambda m=mesh: m)
        assert backbone_model._on_cuda() is cuda
        if cuda:
            assert backbone_model.attention_kernel("cudnn", jnp.bfloat16, 64) == "cudnn"
        else:
            with pytest.raises(ValueError, match="NVIDIA GPU"):
                backbone_model.attention_kernel("cudnn", jnp.bfloat16, 64)


def test_auto_attention_trains_odd_lengths_where_cudnn_would_be_taken(monkeypatch, pair):
    """With cuDNN usable, "auto" differentiates an odd-length batch by einsum, and hands an
    even one to cuDNN (which this CPU cannot run: the call fails, so the route is seen)."""
    from lisendiff_jax.backbone import model as backbone_model

    _, folder, _, _ = pair
    monkeypatch.setattr(backbone_model, "_on_cuda", lambda: True)
    monkeypatch.setattr(backbone_model, "_cudnn_runs", lambda dtype: True)
    model = load_backbone(folder, dtype="bfloat16")

    def loss(model, ids):
        return jnp.sum(model(ids, jnp.ones_like(ids)).astype(jnp.float32))

    grad = nnx.jit(nnx.grad(loss))
    assert all(
        bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grad(model, jnp.ones((2, 7), int)))
    )
    with pytest.raises(Exception, match="(?i)cudnn"):
        grad(model, jnp.ones((2, 8), int))


def test_cached_decoding_equals_full_forward(pair):
    _, _, _, ours = pair
    ids, mask = left_padded_batch(np.random.RandomState(3), [12, 8], 12, 128)
    full = np.asarray(ours(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    cache = ours.init_cache(2, 12)
    prefix, steps = 7, []
    logits, cache = ours.forward(ids[:, :prefix], mask[:, :prefix], cache=cache)
    steps.append(np.asarray(logits))
    for t in range(prefix, 12):
        logits, cache = ours.forward(ids[:, t : t + 1], mask[:, t : t + 1], cache=cache)
        steps.append(np.asarray(logits))
    cached = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(cached[real], full[real], atol=1e-5, rtol=0)


def test_generation_stops_at_eos_and_pads_after(pair):
    _, _, _, ours = pair
    ids = np.random.RandomState(4).randint(3, 128, (2, 6))
    free = generate(ours, ids, params=SamplingParams(max_new_tokens=12, pad_token_id=0))
    free_tokens = np.asarray(free.tokens)
    np.testing.assert_array_equal(free.lengths, [12, 12])
    # Declare row 0's fourth token the EOS: row 0 stops there; row 1 is unaffected up to
    # the first time it emits that same token.
    eos = int(free_tokens[0, 3])
    params = SamplingParams(max_new_tokens=12, eos_token_ids=(eos,), pad_token_id=0)
    stopped = generate(ours, ids, params=params)
    tokens, lengths = np.asarray(stopped.tokens), np.asarray(stopped.lengths)
    first = int(np.argmax(free_tokens[0] == eos))
    assert lengths[0] == first + 1
    np.testing.assert_array_equal(tokens[0, : first + 1], free_tokens[0, : first + 1])
    assert (tokens[0, first + 1 :] == 0).all()
    hits = np.flatnonzero(free_tokens[1] == eos)
    expected_len = 12 if hits.size == 0 else hits[0] + 1
    assert lengths[1] == expected_len
    np.testing.assert_array_equal(tokens[1, :expected_len], free_tokens[1, :expected_len])


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(pair):
    _, _, _, ours = pair
    ids = np.random.RandomState(5).randint(3, 128, (3, 5))
    hot = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95)
    a = generate(ours, ids, params=hot, rng=jax.random.key(7)).tokens
    b = generate(ours, ids, params=hot, rng=jax.random.key(7)).tokens
    c = generate(ours, ids, params=hot, rng=jax.random.key(8)).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # A nucleus smaller than any single token's probability leaves only the argmax.
    narrow = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=1e-6)
    greedy = SamplingParams(max_new_tokens=10)
    np.testing.assert_array_equal(
        generate(ours, ids, params=narrow, rng=jax.random.key(9)).tokens,
        generate(ours, ids, params=greedy).tokens,
    )


def test_a_sampled_row_is_the_same_alone_and_in_a_batch(pair):
    _, _, _, ours = pair
    ids, mask = left_padded_batch(np.random.RandomState(6), [9, 4, 6], 9, 128)
    hot = SamplingParams(max_new_tokens=10, temperature=1.0)
    keys = jax.random.split(jax.random.key(11), 3)
    batch = np.asarray(generate(ours, ids, mask, params=hot, rng=keys).tokens)
    for row in range(3):
        n = int(mask[row].sum())  # alone: the row's prompt without its padding
        alone = generate(ours, ids[row : row + 1, -n:], params=hot, rng=keys[row : row + 1])
        np.testing.assert_array_equal(np.asarray(alone.tokens)[0], batch[row])
    assert len({tuple(r) for r in batch}) == 3
    # One key for the batch gives row i the key fold_in(key, i).
    rows = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(11), jnp.arange(3))
    np.testing.assert_array_equal(
        generate(ours, ids, mask, params=hot, rng=jax.random.key(11)).tokens,
        generate(ours, ids, mask, params=hot, rng=rows).tokens,
    )


def test_bfloat16_weights_stay_close_to_float32(pair):
    _, folder, _, ours = pair
    bf16 = load_backbone(folder, dtype="bfloat16")
    assert bf16.embed_tokens.embedding.dtype == jnp.bfloat16
    ids = jnp.asarray(np.random.RandomState(6).randint(0, 128, (2, 24)), jnp.int32)
    ref, out = np.asarray(ours(ids)), np.asarray(bf16(ids))
    assert out.dtype == np.float32
    # Measured on these tiny models: max |diff| 0.029-0.045 on logits spanning 4.1-4.5 (1%),
    # with the same argmax everywhere.
    assert np.abs(out - ref).max() < 0.06
    assert np.abs(out - ref).max() < 0.02 * (ref.max() - ref.min())
    # bf16 storage with float32 compute is closer still: only the weights are rounded.
    mixed = np.asarray(load_backbone(folder, dtype="bfloat16", compute_dtype="float32")(ids))
    assert np.abs(mixed - ref).max() <= np.abs(out - ref).max()


def test_sharded_checkpoint_loads(tmp_path):
    torch_model = make_checkpoint("llama_gqa_llama3", tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    ids = np.random.RandomState(0).randint(0, 128, (1, 9))
    out = np.asarray(load_backbone(tmp_path)(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(out, torch_logits(torch_model, ids), atol=ATOL, rtol=0)


def test_num_params_matches_transformers(pair):
    _, folder, torch_model, _ = pair
    expected = sum(p.numel() for p in torch_model.parameters())
    assert BackboneConfig.from_pretrained(folder).num_params == expected


def test_transformers4_rope_keys_read_like_transformers5(pair):
    _, folder, _, _ = pair
    v5 = json.loads((folder / "config.json").read_text())
    params = dict(v5.pop("rope_parameters"))
    v4 = dict(v5, rope_theta=params.pop("rope_theta"))
    if params.get("rope_type", "default") != "default":
        v4["rope_scaling"] = dict(params, type=params.pop("rope_type"))
    assert (
        BackboneConfig.from_hf_dict(v4).rope
        == BackboneConfig.from_hf_dict(json.loads((folder / "config.json").read_text())).rope
    )


def edit_config(folder, **changes):
    """Rewrites the checkpoint's config.json with `changes`, keeping its weights."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, **changes)))
    return folder


@pytest.mark.parametrize(
    "kind, changes, error, message",
    [
        (
            "llama_tied",
            {"model_type": "gpt2"},
            BackboneConfigError,
            r"config\.json: model_type 'gpt2'",
        ),
        # A fourth layer the checkpoint does not have: its 9 tensors are missing.
        (
            "llama_gqa_llama3",
            {"num_hidden_layers": 4},
            CheckpointError,
            r"lacks 9 tensor.*model\.layers\.3\.",
        ),
        (
            "qwen2_bias",
            {"intermediate_size": 100},
            CheckpointError,
            r"mlp\.\w+_proj\.weight has shape",
        ),
        # A Llama config without attention biases cannot place the checkpoint's q/k/v biases.
        (
            "qwen2_bias",
            {"model_type": "llama"},
            CheckpointError,
            r"unexpected tensor model\.layers\.\d+\.self_attn",
        ),
    ],
)
def test_checkpoint_that_does_not_fit_its_config_is_named(tmp_path, kind, changes, error, message):
    make_checkpoint(kind, tmp_path)
    with pytest.raises(error, match=message):
        load_backbone(edit_config(tmp_path, **changes))


def test_folder_without_safetensors_and_unknown_hub_id(tmp_path):
    make_checkpoint("llama_tied", tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_backbone(tmp_path)
    with pytest.raises(CheckpointError, match="no-such-org/no-such-model: not a local folder"):
        load_backbone("no-such-org/no-such-model")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rotary_is_transformers_rotate_half_without_a_concatenate(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from lisendiff_jax.backbone.rope import apply_rotary, rotary_tables

    inv_freq = (1.0 / 10000.0 ** (np.arange(0, 64, 2) / 64)).astype(np.float32)
    cos, sin = rotary_tables(jnp.arange(37)[None].repeat(2, 0), inv_freq)  # [2, 37, 64]
    x = jax.random.normal(jax.random.key(0), (2, 37, 4, 64), dtype)  # [batch, seq, heads, dim]

    def by_concatenate(x):  # rotate_half as transformers writes it
        rotated = jnp.concatenate([-x[..., 32:], x[..., :32]], axis=-1)
        return x * cos[:, :, None].astype(x.dtype) + rotated * sin[:, :, None].astype(x.dtype)

    def square_sum(f):
        return jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32) ** 2))

    for ours, reference in [
        (lambda x: apply_rotary(x, cos, sin), by_concatenate),
        (square_sum(lambda x: apply_rotary(x, cos, sin)), square_sum(by_concatenate)),
    ]:
        np.testing.assert_array_equal(
            np.asarray(ours(x).astype(jnp.float32)), np.asarray(reference(x).astype(jnp.float32))
        )
        assert "concatenate" not in str(jax.make_jaxpr(ours)(x))
    if dtype == jnp.float32:
        q = torch.tensor(np.asarray(x)).transpose(1, 2)  # transformers': [batch, heads, seq, dim]
        expected, _ = apply_rotary_pos_emb(
            q, q, torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin))
        )
        np.testing.assert_allclose(
            np.asarray(apply_rotary(x, cos, sin)), expected.transpose(1, 2).numpy(), atol=1e-6
        )
