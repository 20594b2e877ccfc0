"""Batching: bucketed shapes, padding rows, seeded epochs, resuming from a saved position."""

import itertools
import json

import numpy as np
import pytest

from lisendiff_jax.data.batching import (
    DataPosition,
    bucket_length,
    collate,
    epoch_order,
    iterate_batches,
    length_buckets,
    steps_per_epoch,
)
from lisendiff_jax.data.formatting import encode_chat
from lisendiff_jax.testing import tiny_tokenizer

BATCH = 4
BUCKETS = (32, 64, 128)
NUM_EXAMPLES = 11  # not a multiple of BATCH, so every epoch ends with padding rows


@pytest.fixture(scope="module")
def encoded():
    tokenizer = tiny_tokenizer()
    return [
        encode_chat(tokenizer, ["hi " * (3 * i)], "Be kind.", 128, "ok " * (i % 4 + 1))
        for i in range(NUM_EXAMPLES)
    ]


def take(stream, n):
    return list(itertools.islice(stream, n))


def test_length_buckets_and_lookup():
    assert length_buckets(1000) == (64, 128, 256, 512, 1000)
    assert length_buckets(256) == (64, 128, 256)
    assert bucket_length(1, BUCKETS) == 32
    assert bucket_length(33, BUCKETS) == 64
    assert bucket_length(128, BUCKETS) == 128
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_length(129, BUCKETS)


def test_shapes_come_from_a_small_fixed_set(encoded):
    lengths = {len(e.input_ids) for e in encoded}
    assert len(lengths) > len(BUCKETS)  # more distinct lengths than shapes
    stream = iterate_batches(encoded, BATCH, BUCKETS, pad_id=0, seed=0)
    batches = [batch for batch, _ in take(stream, 3 * steps_per_epoch(NUM_EXAMPLES, BATCH))]
    shapes = {batch["input_ids"].shape for batch in batches}
    assert shapes <= {(BATCH, b) for b in BUCKETS}
    for batch in batches:
        assert {k: v.dtype for k, v in batch.items()} == dict.fromkeys(batch, np.int32)
        assert batch["example_index"].shape == batch["row_mask"].shape == (BATCH,)


def test_rows_hold_their_examples_and_padding_rows_are_masked(encoded):
    indices = np.array([3, 7, 1])
    batch = collate(encoded, indices, BATCH, BUCKETS, pad_id=0)
    assert batch["row_mask"].tolist() == [1, 1, 1, 0]
    assert batch["example_index"].tolist() == [3, 7, 1, 3]
    for row, index in enumerate(batch["example_index"]):
        item = encoded[index]
        n = len(item.input_ids)
        assert (batch["input_ids"][row, :n] == item.input_ids).all()
        assert (batch["input_ids"][row, n:] == 0).all()
        assert batch["attention_mask"][row].sum() == n
        expected_loss = item.loss_mask if batch["row_mask"][row] else np.zeros(n)
        assert (batch["loss_mask"][row, :n] == expected_loss).all()
        assert batch["loss_mask"][row, n:].sum() == 0


def test_each_epoch_visits_every_example_once_in_a_seeded_order(encoded):
    steps = steps_per_epoch(NUM_EXAMPLES, BATCH)
    stream = iterate_batches(encoded, BATCH, BUCKETS, pad_id=0, seed=5)
    epochs = []
    for _ in range(2):
        batches = [batch for batch, _ in take(stream, steps)]
        seen = np.concatenate([b["example_index"][b["row_mask"] == 1] for b in batches])
        assert sorted(seen.tolist()) == list(range(NUM_EXAMPLES))
        epochs.append(seen)
    assert (epochs[0] == epoch_order(NUM_EXAMPLES, 5, 0)).all()
    assert not (epochs[0] == epochs[1]).all()
    assert not (epoch_order(NUM_EXAMPLES, 6, 0) == epochs[0]).all()


@pytest.mark.parametrize("saved_after", [1, 3, 5])  # mid-epoch, at the epoch end, next epoch
def test_resuming_from_a_saved_position_gives_the_same_batches(encoded, saved_after):
    reference = take(iterate_batches(encoded, BATCH, BUCKETS, pad_id=0, seed=1), 8)
    saved = json.loads(json.dumps(reference[saved_after - 1][1].to_dict()))
    resumed = iterate_batches(
        encoded, BATCH, BUCKETS, pad_id=0, seed=1, start=DataPosition.from_dict(saved)
    )
    for (want, want_position), (got, got_position) in zip(
        reference[saved_after:], take(resumed, 8 - saved_after), strict=True
    ):
        assert want_position == got_position
        assert want.keys() == got.keys()
        assert all((want[k] == got[k]).all() for k in want)


def test_position_marks_the_epoch_boundary(encoded):
    steps = steps_per_epoch(NUM_EXAMPLES, BATCH)
    positions = [p for _, p in take(iterate_batches(encoded, BATCH, BUCKETS, 0, 0), steps)]
    assert positions[0] == DataPosition(0, BATCH)
    assert positions[-1] == DataPosition(1, 0)


def test_bad_start_is_rejected(encoded):
    with pytest.raises(ValueError, match="outside an epoch"):
        next(iterate_batches(encoded, BATCH, BUCKETS, 0, 0, start=DataPosition(0, 99)))
