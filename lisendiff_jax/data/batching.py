"""Fixed-shape batches of encoded chats, in a seeded order that can resume mid-epoch.

Shapes. Every batch has `batch_size` rows and a sequence length taken from a short list of
buckets (the smallest bucket that holds the longest chat of the batch), so a jitted step
compiles once per bucket instead of once per length. Sequences are right-padded.

Rows. A batch short of examples (the end of an epoch) is filled with copies of its first row
whose `row_mask` is 0 and whose loss mask is all 0; copies rather than blank rows keep every
attention row non-empty and every `example_index` valid for gathering cached embeddings. Losses
that are not token losses (the diffusion loss) must be weighted by `row_mask`.

Order. Epoch e visits the examples in the permutation drawn from (seed, e), independent of
earlier epochs, so a `DataPosition` (epoch, offset) is all a checkpoint needs to resume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from lisendiff_jax.data.formatting import Encoded


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the stream stands: `offset` examples of epoch `epoch`'s order are consumed."""

    epoch: int = 0
    offset: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    @classmethod
    def from_dict(cls, value: dict[str, int]) -> DataPosition:
        return cls(epoch=int(value["epoch"]), offset=int(value["offset"]))


def length_buckets(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` up to `max_length`, which closes the list."""
    buckets = []
    length = smallest
    while length < max_length:
        buckets.append(length)
        length *= 2
    return (*buckets, max_length)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` tokens."""
    fitting = [b for b in buckets if b >= length]
    if not fitting:
        raise ValueError(f"sequence of {length} tokens exceeds the largest bucket {max(buckets)}")
    return min(fitting)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return -(-num_examples // batch_size)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order [num_examples] in which epoch `epoch` visits the examples."""
    return np.random.default_rng((seed, epoch)).permutation(num_examples)


def collate(
    encoded: Sequence[Encoded],
    indices: np.ndarray,
    batch_size: int,
    buckets: Sequence[int],
    pad_id: int,
) -> dict[str, np.ndarray]:
    """One padded batch of the examples at `indices` (at most `batch_size` of them).

    Returns input_ids, attention_mask, loss_mask [batch, seq] int32; example_index [batch]
    int32 (position in `encoded`, for the cached embeddings and style); row_mask [batch] int32.
    """
    if not 0 < len(indices) <= batch_size:
        raise ValueError(f"need 1..{batch_size} indices, got {len(indices)}")
    rows = np.concatenate([indices, np.full(batch_size - len(indices), indices[0])])
    row_mask = (np.arange(batch_size) < len(indices)).astype(np.int32)  # [batch]
    seq = bucket_length(max(len(encoded[i].input_ids) for i in indices), buckets)
    input_ids = np.full((batch_size, seq), pad_id, np.int32)  # [batch, seq]
    attention_mask = np.zeros((batch_size, seq), np.int32)
    loss_mask = np.zeros((batch_size, seq), np.int32)
    for row, index in enumerate(rows):
        item = encoded[index]
        n = len(item.input_ids)
        input_ids[row, :n] = item.input_ids
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = item.loss_mask * row_mask[row]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
        "example_index": rows.astype(np.int32),
        "row_mask": row_mask,
    }


def iterate_batches(
    encoded: Sequence[Encoded],
    batch_size: int,
    buckets: Sequence[int],
    pad_id: int,
    seed: int,
    start: DataPosition = DataPosition(),
) -> Iterator[tuple[dict[str, np.ndarray], DataPosition]]:
    """Endless stream of (batch, position after it), epoch after epoch, from `start`.

    Saving the position that came with a batch and passing it back as `start` continues with
    the next batch. An epoch ends with a partial batch rather than borrowing from the next one.
    `pad_id` may be any id: padding is masked out.
    """
    n = len(encoded)
    if n == 0:
        raise ValueError("no examples to batch")
    if not 0 <= start.offset <= n:
        raise ValueError(f"position offset {start.offset} outside an epoch of {n} examples")
    epoch, offset = start.epoch, start.offset
    while True:
        order = epoch_order(n, seed, epoch)
        while offset < n:
            indices = order[offset : offset + batch_size]
            offset += len(indices)
            position = DataPosition(epoch, offset) if offset < n else DataPosition(epoch + 1, 0)
            yield collate(encoded, indices, batch_size, buckets, pad_id), position
        epoch, offset = epoch + 1, 0
