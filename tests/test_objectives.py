"""The training objective against independent math: L_LM against the cross-entropy of
transformers' own model, L_diff against a NumPy recomputation of the same draws, and the
context summary's gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny_checkpoints import make_checkpoint

from lisendiff_jax.backbone import load_backbone
from lisendiff_jax.config import base_config
from lisendiff_jax.method.diffusion import LatentStats
from lisendiff_jax.method.model import LisenDiff

D_ENC = 16
N_STEPS = 50
# Compiled: op-by-op execution of the model is slow on the CPU.
losses = nnx.jit(lambda model, batch, rng: model.losses(batch, rng))


@nnx.jit
def denoise(model: LisenDiff, y_t: jax.Array, t: jax.Array, batch: dict) -> jax.Array:
    """The model's y0 prediction from y_t at steps t, for the context and styles of `batch`."""
    style = batch["style_id"]
    x = model.summary(batch["context_embeddings"], batch["context_mask"], style)
    return model.denoisers(y_t, t, x, style)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(folder, the transformers model written there) for a tiny float32 Llama."""
    folder = tmp_path_factory.mktemp("llama")
    return folder, make_checkpoint("llama_gqa_llama3", folder)


@pytest.fixture(scope="module")
def model(checkpoint) -> LisenDiff:
    """A float32 LisenDiff at step 0 (LoRA B and the cross-attention outputs zero) with
    non-trivial latent statistics and a loss weighting that is not constant; no test changes
    it."""
    m = base_config().model
    m.param_dtype = m.compute_dtype = m.trainable_dtype = "float32"
    m.lora.dropout = 0.0
    m.cross_attention.last_n_layers = 2
    m.cross_attention.num_heads = 2
    m.cross_attention.num_latents = 2  # make_batch's latent sets
    m.summary.num_heads = m.denoiser.num_heads = 2
    m.summary.mlp_ratio = m.denoiser.mlp_ratio = 1
    m.diffusion.num_steps = N_STEPS
    m.diffusion.loss_weight = "min_snr"
    model = LisenDiff(load_backbone(checkpoint[0], "float32"), m, D_ENC, rngs=nnx.Rngs(0))
    rng = np.random.RandomState(7)
    model.set_latent_stats(LatentStats(mean=rng.randn(D_ENC), scale=0.5 + rng.rand(D_ENC)))
    return model


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Two left-padded rows (12 and 8 real tokens) whose responses are their last 3 and 5
    tokens, and a third, padding row (row_mask 0) that only the diffusion loss could see."""
    rng = np.random.RandomState(seed)
    seq, lengths, responses = 12, (12, 8, 6), (3, 5, 0)
    attention_mask = np.zeros((3, seq), np.int32)
    loss_mask = np.zeros((3, seq), np.int32)
    for row, (n, r) in enumerate(zip(lengths, responses, strict=True)):
        attention_mask[row, seq - n :] = 1
        loss_mask[row, seq - r :] = 1  # nothing when r = 0
    ids = np.where(attention_mask == 1, rng.randint(3, 128, (3, seq)), 0).astype(np.int32)
    return {
        "input_ids": ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "row_mask": np.array([1, 1, 0], np.int32),
        "style_id": np.array([1, 0, 1], np.int32),
        "response_latent": (2.0 + 3.0 * rng.randn(3, 2, D_ENC)).astype(np.float32),  # L = 2
        "context_embeddings": rng.randn(3, 4, D_ENC).astype(np.float32),
        "context_mask": np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], bool),
    }


def test_step0_lm_loss_equals_transformers_cross_entropy(checkpoint, model):
    torch_model = checkpoint[1]
    batch = make_batch()
    _, parts = losses(model, batch, jax.random.key(0))

    ids = torch.tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.tensor(batch["attention_mask"], dtype=torch.long)
    # Positions count real tokens only, as transformers' generate() sets them for left padding.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = torch_model(ids, attention_mask=mask, position_ids=positions).logits.double()
    # The logits at position i predict token i + 1, which is a response token when
    # loss_mask[i + 1] is set.
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    picked = log_probs.gather(-1, ids[:, 1:, None])[..., 0]
    weights = torch.tensor(batch["loss_mask"][:, 1:], dtype=torch.float64)
    assert weights.sum(dim=1).tolist() == [3.0, 5.0, 0.0]
    reference = float(-(picked * weights).sum() / weights.sum())
    np.testing.assert_allclose(float(parts["lm_loss"]), reference, rtol=0, atol=1e-5)


def test_diff_loss_equals_numpy(model):
    batch = make_batch(1)
    rng = jax.random.key(0)
    _, parts = losses(model, batch, rng)

    # The draws `losses` makes from `rng`: a step per row, then the noise.
    t_key, noise_key = jax.random.split(rng)
    latents = batch["response_latent"].astype(np.float64)  # [B, L, d]
    t = np.asarray(jax.random.randint(t_key, (3,), 0, N_STEPS))
    noise = np.asarray(jax.random.normal(noise_key, latents.shape), np.float64)
    assert len(set(t.tolist())) == 3  # distinct steps, so a mixed-up t cannot go unseen

    stats = model.latent_stats
    y0 = (latents - np.asarray(stats.mean)) / np.asarray(stats.scale)
    alpha_bar = np.cumprod(1.0 - np.linspace(0.001, 0.02, N_STEPS))  # the paper's schedule
    abar = alpha_bar[t][:, None, None]
    y_t = np.sqrt(abar) * y0 + np.sqrt(1.0 - abar) * noise

    y0_pred = denoise(model, jnp.asarray(y_t, jnp.float32), jnp.asarray(t), batch)

    error = np.mean(np.square(np.asarray(y0_pred, np.float64) - y0), axis=-1)  # [B, L]
    # min(SNR_t, 5) (Hang et al.); "uniform" is the same sum with every weight 1.
    weight = np.minimum(alpha_bar[t] / (1.0 - alpha_bar[t]), 5.0)
    keep = batch["row_mask"].astype(bool)
    assert len(set(weight[keep].tolist())) > 1  # the weights differ between the kept rows
    reference = np.mean(weight[keep, None] * error[keep])
    np.testing.assert_allclose(float(parts["diff_loss"]), reference, rtol=1e-5)


def test_gradients_reach_the_style_summary_queries(model):
    batch = {k: jnp.asarray(v) for k, v in make_batch(2).items()}
    # Differentiated by the queries only: the rest of the backward pass is not needed here.
    wrt_queries = nnx.DiffState(0, nnx.PathContains("queries"))
    grad = nnx.jit(nnx.grad(lambda m: m.losses(batch, jax.random.key(0))[0], argnums=wrt_queries))(
        model
    )
    queries = np.asarray(grad["summary"]["queries"][...])  # [n_styles, n_queries, d]
    # Both styles occur in a real row, so both styles' queries get a gradient.
    assert np.all(np.abs(queries).max(axis=(1, 2)) > 1e-6), queries
