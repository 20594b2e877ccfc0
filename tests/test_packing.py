"""Sequence packing (`data.packing`): several examples share a row, each attending to its own
tokens and latent only, with the losses, gradients and resumption of unpacked batches."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lisendiff_jax.backbone import BackboneConfig
from lisendiff_jax.backbone.model import Decoder
from lisendiff_jax.backbone.presets import LLAMA_34M, llama3_rope
from lisendiff_jax.config import ConfigError, load_config, set_value
from lisendiff_jax.data.batching import (
    DataPosition,
    collate,
    collate_packed,
    epoch_order,
    iterate_batches,
    pack_rows,
    packed_steps_per_epoch,
    packing_segments,
)
from lisendiff_jax.data.formatting import Encoded
from lisendiff_jax.method.model import LisenDiff, split_for_training, training_loss
from lisendiff_jax.sharding import MeshPlan
from lisendiff_jax.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
D_ENC, N_CONTEXT, VOCAB = 16, 3, 128
TINY = dict(
    LLAMA_34M,
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_parameters=llama3_rope(16),  # positions past 16 reach every rotary band
)
# Token counts (prompt, response) of the examples: 5 fill two packed rows of 40 tokens. The
# third has no prompt, so only the segment boundary keeps the token before it from predicting
# its first token.
SHAPES = ((6, 5), (9, 4), (0, 7), (12, 8), (5, 6))
ROW = 40


def examples(shapes=SHAPES, seed=0) -> list[Encoded]:
    rng = np.random.RandomState(seed)
    return [
        Encoded(rng.randint(3, VOCAB, p + r).astype(np.int32), prompt_length=p, kept_turns=1)
        for p, r in shapes
    ]


def per_example(n: int, n_latents: int, seed: int = 1) -> dict[str, np.ndarray]:
    """What the encoder cache gives each of `n` examples, indexed by example."""
    rng = np.random.RandomState(seed)
    return {
        "response_latent": rng.randn(n, n_latents, D_ENC).astype(np.float32),
        "context_embeddings": rng.randn(n, N_CONTEXT, D_ENC).astype(np.float32),
        "context_mask": rng.rand(n, N_CONTEXT) < 0.7,
        "style_id": (np.arange(n) % 2).astype(np.int32),
    }


def with_cache(batch: dict, cache: dict) -> dict:
    """`batch` as the Trainer feeds it: example_index replaced by the examples' cached arrays."""
    arrays = {k: v for k, v in batch.items() if k != "example_index"}
    arrays.update({k: v[batch["example_index"]] for k, v in cache.items()})
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def packed_and_unpacked(n_latents: int):
    """A packed batch of SHAPES (2 rows of K = 3 slots) and the same examples unpacked, one per
    row in the packed batch's slot order (empty slots: masked rows), so both draw the same
    diffusion steps and noise for each example."""
    encoded = examples()
    segments = packing_segments(encoded, ROW)
    rows = pack_rows(encoded, np.arange(len(encoded)), 2, ROW, segments)
    assert (segments, rows) == (3, [[0, 1, 2], [3, 4]])
    packed = collate_packed(encoded, rows, 2, segments, (ROW,), pad_id=0)
    slots = packed["example_index"].reshape(-1)  # [B*K]
    unpacked = collate(encoded, slots, len(slots), (ROW,), pad_id=0)
    unpacked["row_mask"] = packed["segment_mask"].reshape(-1)
    unpacked["loss_mask"] *= unpacked["row_mask"][:, None]
    cache = per_example(len(encoded), n_latents)
    return packed, with_cache(packed, cache), with_cache(unpacked, cache)


@functools.cache
def build(n_latents: int) -> LisenDiff:
    """A tiny LisenDiff with every trainable parameter moved off its initial value (zero LoRA B
    and cross-attention outputs would hide the latent and the adapters)."""
    c = load_config(ROOT / "configs" / "tiny.py")
    c.model.lora.dropout = 0.0
    c.model.cross_attention.num_heads = c.model.summary.num_heads = 2
    c.model.denoiser.num_heads = 2
    c.model.cross_attention.num_latents = n_latents
    decoder = Decoder(BackboneConfig.from_hf_dict(TINY), rngs=nnx.Rngs(0))
    model = LisenDiff(decoder, c.model, D_ENC, rngs=nnx.Rngs(1))
    rng = np.random.RandomState(2)
    trainable = nnx.state(model, model.trainable_filter())
    nnx.update(
        model,
        jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape).astype(x.dtype), trainable),
    )
    return model


@nnx.jit
def logits_of(backbone: Decoder, batch: dict) -> jax.Array:
    """Logits [B, T, vocab] with the batch's cross-attention inputs (and segments, if packed)."""
    return backbone(
        batch["input_ids"],
        batch["attention_mask"],
        positions=batch.get("positions"),
        latents=batch["response_latent"],
        segment_ids=batch.get("segment_ids"),
    )


def token_nll(model: LisenDiff, batch: dict) -> np.ndarray:
    """NLL [B, T-1] of each next token."""
    logp = jax.nn.log_softmax(logits_of(model.backbone, batch)[:, :-1], axis=-1)
    return -np.asarray(jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], -1)[..., 0])


@pytest.mark.parametrize("n_latents", [1, 2])  # one latent: the gather path; two: attention
def test_packed_losses_and_gradients_equal_unpacked(n_latents):
    raw, packed, unpacked = packed_and_unpacked(n_latents)
    model = build(n_latents)

    # Per example: the NLL of its response tokens, packed (its span of its row) and alone.
    nll_packed, nll_alone = token_nll(model, packed), token_nll(model, unpacked)
    for slot, index in enumerate(raw["example_index"].reshape(-1)[:5]):
        row, k = divmod(slot, 3)
        in_row = np.flatnonzero(raw["segment_ids"][row] == k + 1)
        span = in_row[:-1]  # positions predicting the segment's next token
        weights = raw["loss_mask"][row, span + 1]
        alone = np.arange(len(span))
        got = np.sum(nll_packed[row, span] * weights)
        want = np.sum(nll_alone[slot, alone] * unpacked["loss_mask"][slot, alone + 1])
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"example {index}")

    graphdef, trainable, frozen = split_for_training(model)
    key = jax.random.key(3)

    @jax.jit
    def loss(batch):
        return jax.value_and_grad(training_loss, argnums=1, has_aux=True)(
            graphdef, trainable, frozen, batch, key
        )

    (total_p, metrics_p), grads_p = loss(packed)
    (total_u, metrics_u), grads_u = loss(unpacked)
    assert float(metrics_p["diff_loss"]) > 0
    for name in ("lm_loss", "diff_loss"):
        np.testing.assert_allclose(metrics_p[name], metrics_u[name], rtol=1e-5, err_msg=name)
    flat_p, flat_u = nnx.to_flat_state(grads_p), nnx.to_flat_state(grads_u)
    for (path, gp), (_, gu) in zip(flat_p, flat_u, strict=True):
        gp, gu = np.asarray(gp[...]), np.asarray(gu[...])
        np.testing.assert_allclose(gp, gu, atol=1e-5 * max(1.0, np.abs(gu).max()), err_msg=path)


@pytest.mark.parametrize("n_latents", [1, 2])
def test_no_token_sees_another_segment(n_latents):
    """Probe: changing segment 1's tokens and latent leaves segment 2's logits bit for bit,
    and changing segment 2's latent leaves segment 1's, while each change moves its own."""
    _, packed, _ = packed_and_unpacked(n_latents)
    model = build(n_latents)
    seg = np.asarray(packed["segment_ids"][0])
    first, second = seg == 1, seg == 2

    def logits(batch):
        return np.asarray(logits_of(model.backbone, batch)[0])

    base = logits(packed)
    row = packed["input_ids"][0]
    ids = packed["input_ids"].at[0].set(jnp.where(first, (row + 7) % VOCAB, row))
    latent = packed["response_latent"].at[0, 0].add(1.0)
    changed_first = logits(dict(packed, input_ids=ids, response_latent=latent))
    np.testing.assert_array_equal(changed_first[second], base[second])
    assert (np.abs(changed_first[first] - base[first]).max(axis=-1) > 0).all()

    latent = packed["response_latent"].at[0, 1].add(1.0)
    changed_second = logits(dict(packed, response_latent=latent))
    np.testing.assert_array_equal(changed_second[first], base[first])
    assert (np.abs(changed_second[second] - base[second]).max(axis=-1) > 0).all()


def test_an_epoch_packs_every_example_once_and_resumes_mid_epoch():
    shapes = [(3 + i % 5, 2 + i % 3) for i in range(23)]
    encoded = examples(shapes)
    row, batch_size, seed = 24, 2, 7
    segments = packing_segments(encoded, row)
    assert segments == 4  # four of the shortest (5 tokens) fit in 24
    stream = iterate_batches(encoded, batch_size, (row,), 0, seed, segments=segments)
    steps = packed_steps_per_epoch(encoded, batch_size, row, segments, epoch_order(23, seed, 0))
    epoch = list(itertools.islice(stream, steps))
    assert epoch[-1][1] == DataPosition(1, 0) and epoch[-2][1].epoch == 0
    assert steps < 12  # ceil(23 / 2) unpacked
    seen, order = 0, epoch_order(23, seed, 0).tolist()
    for batch, _ in epoch:
        got = batch["example_index"][batch["segment_mask"] == 1].tolist()
        # Each batch holds the next run of the epoch's order, its rows filled first fit.
        assert sorted(got) == sorted(order[seen : seen + len(got)])
        seen += len(got)
        for r, k in zip(*np.nonzero(batch["segment_mask"]), strict=True):
            item = encoded[batch["example_index"][r, k]]
            span = batch["segment_ids"][r] == k + 1  # its tokens, positions counting from 0
            np.testing.assert_array_equal(batch["input_ids"][r, span], item.input_ids)
            np.testing.assert_array_equal(batch["loss_mask"][r, span], item.loss_mask)
            np.testing.assert_array_equal(batch["positions"][r, span], np.arange(span.sum()))
    assert seen == 23
    # The epoch's last batch: the row it could not fill is a copy without loss or segments.
    last = epoch[-1][0]
    np.testing.assert_array_equal(last["segment_mask"][1], 0)
    assert not last["loss_mask"][1].any()
    np.testing.assert_array_equal(last["input_ids"][1], last["input_ids"][0])
    # Resuming from any saved position continues with the same batches.
    for i in (0, 2):
        resumed = iterate_batches(
            encoded, batch_size, (row,), 0, seed, start=epoch[i][1], segments=segments
        )
        for (want, _), (got, _) in zip(epoch[i + 1 :], resumed, strict=False):
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_rows_fill_earlier_gaps_and_the_batch_stops_at_the_first_misfit():
    # Rows of 10 tokens, 2 a batch. 3 tokens fit the gap the 6 left in the first row; the 9 then
    # fits no row, so the batch ends there although the 1 after it would fit.
    encoded = examples([(0, n) for n in (6, 8, 3, 9, 1)])
    rows = pack_rows(encoded, np.arange(5), batch_size=2, row_length=10, segments=3)
    assert rows == [[0, 2], [1]]
    assert pack_rows(encoded, np.arange(3, 5), 2, 10, 3) == [[3, 4]]
    # At most `segments` examples a row, even with room left.
    assert pack_rows(encoded, np.array([4, 4, 4]), 2, 10, 2) == [[4, 4], [4]]


def test_packing_is_an_option_that_takes_only_a_bool():
    c = load_config(ROOT / "configs" / "tiny.py")
    assert c.data.packing is False
    set_value(c, "data.packing", "true")
    assert c.data.packing is True
    with pytest.raises(ConfigError, match=r"^--config\.data\.packing: 'yes' is not a bool"):
        set_value(c, "data.packing", "yes")


def test_packed_training_resumes_after_a_kill_exactly(tmp_path):
    """The run saved at step 3 then killed (steps 4-5 lost) and resumed ends where the same run
    uninterrupted does: same parameters, optimizer state and data position."""
    from tiny_workdir import write_dialogues

    c = load_config(ROOT / "configs" / "tiny.py")
    for name in list(c.data.sources):
        del c.data.sources[name]
    c.data.sources.mine = dict(
        format="jsonl", path=str(write_dialogues(tmp_path / "d.jsonl")), fraction=1.0, split=""
    )
    # No system prompt: 29-47 token examples, up to 3 to a row of 96.
    c.data.max_length, c.data.train_prompt, c.data.packing = 96, "none", True
    c.batch_size, c.num_steps, c.checkpoint_every = 2, 5, 3
    c.learning_rate, c.warmup_steps = 3e-3, 0
    # Rows split over two devices: packed [batch, K] arrays take the sharded path too.
    mesh = MeshPlan.create((1, 2, 1), devices=jax.devices()[:2])

    straight = Trainer(c, tmp_path / "run", progress=False, mesh=mesh)
    assert straight.segments == 3
    straight.run()  # saves step 3 only: what a kill after step 5 leaves
    straight.checkpointer.wait()
    resumed = Trainer(c, tmp_path / "run", progress=False, mesh=mesh)
    assert resumed.step == 3 and resumed.position != straight.position
    resumed._step_fn = straight._step_fn  # the same step, compiled once
    resumed.run()
    assert resumed.position == straight.position
    a, b = nnx.to_flat_state(straight.trainable), nnx.to_flat_state(resumed.trainable)
    for (path, x), (_, y) in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(path))
    opt_a, opt_b = jax.tree.leaves(straight.opt_state), jax.tree.leaves(resumed.opt_state)
    for x, y in zip(opt_a, opt_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    straight.close()
    resumed.close()
