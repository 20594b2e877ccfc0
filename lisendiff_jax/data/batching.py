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

Packing (`data.packing`). Rows of `max_length` tokens (the largest bucket) are filled with
whole examples in the same epoch order: an example joins the first of the batch's rows that it
fits and that holds fewer than `segments` (K) examples, else it opens the next row; a batch
ends at the first example that no row can take (`pack_rows`). Positions restart at each example
and `segment_ids` number a row's examples 1..K (0 on padding), so attention stays inside each
example (see `Decoder.hidden_states`). Per-example arrays become per segment slot, [batch, K]:
`example_index` (an empty slot repeats the batch's first example) and `segment_mask`, which
takes `row_mask`'s role. The offset still counts examples, so a position resumes exactly. The
last batch of an epoch may have fewer full rows; the rest are copies of its first row with
`segment_mask` and loss mask 0, as in an unpacked batch.
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


def packing_segments(encoded: Sequence[Encoded], row_length: int) -> int:
    """K for packed rows of `row_length` tokens: the most examples greedy packing can put in
    one row, as many of the shortest examples as fit (at least 1)."""
    lengths = np.sort([len(item.input_ids) for item in encoded])
    return max(1, int(np.searchsorted(np.cumsum(lengths), row_length, side="right")))


def pack_rows(
    encoded: Sequence[Encoded],
    order: np.ndarray,
    batch_size: int,
    row_length: int,
    segments: int,
) -> list[list[int]]:
    """The rows (lists of example indices) of the packed batch that starts at `order[0]`: at
    most `batch_size` rows of at most `segments` examples and `row_length` tokens. Each example
    in turn goes to the first row with room for it, or opens a new one; the batch ends at the
    first example that no row can take, so a batch is always a run of `order` and the next one
    starts where it stopped."""
    rows: list[list[int]] = []
    used: list[int] = []  # tokens in each row
    for index in order:
        n = len(encoded[index].input_ids)
        # First fit rather than only the last row: a short example fills a gap left earlier.
        row = next(
            (r for r in range(len(rows)) if used[r] + n <= row_length and len(rows[r]) < segments),
            None,
        )
        if row is None:
            if len(rows) == batch_size:
                break
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append(int(index))
        used[row] += n
    return rows


def collate_packed(
    encoded: Sequence[Encoded],
    rows: Sequence[Sequence[int]],
    batch_size: int,
    segments: int,
    buckets: Sequence[int],
    pad_id: int,
) -> dict[str, np.ndarray]:
    """One packed batch of `rows` (from `pack_rows`; at most `batch_size`).

    Returns input_ids, attention_mask, loss_mask, segment_ids (1..K, 0 on padding), positions
    [batch, seq] int32; example_index, segment_mask [batch, K] int32.
    """
    if not 0 < len(rows) <= batch_size:
        raise ValueError(f"need 1..{batch_size} rows, got {len(rows)}")
    lengths = [sum(len(encoded[i].input_ids) for i in row) for row in rows]
    seq = bucket_length(max(lengths), buckets)
    arrays = {
        name: np.full((batch_size, seq), pad_id if name == "input_ids" else 0, np.int32)
        for name in ("input_ids", "attention_mask", "loss_mask", "segment_ids", "positions")
    }  # each [batch, seq]
    example_index = np.full((batch_size, segments), rows[0][0], np.int32)  # [batch, K]
    segment_mask = np.zeros((batch_size, segments), np.int32)
    for r, row in enumerate(rows):
        start = 0
        for k, index in enumerate(row):
            item = encoded[index]
            span = slice(start, start + len(item.input_ids))
            arrays["input_ids"][r, span] = item.input_ids
            arrays["attention_mask"][r, span] = 1
            arrays["loss_mask"][r, span] = item.loss_mask
            arrays["segment_ids"][r, span] = k + 1
            arrays["positions"][r, span] = np.arange(len(item.input_ids))
            example_index[r, k], segment_mask[r, k] = index, 1
            start = span.stop
    for r in range(len(rows), batch_size):  # an epoch's last batch: masked copies of row 0
        for name, array in arrays.items():
            array[r] = 0 if name == "loss_mask" else array[0]
        example_index[r] = example_index[0]
    return {**arrays, "example_index": example_index, "segment_mask": segment_mask}


def packed_steps_per_epoch(
    encoded: Sequence[Encoded], batch_size: int, row_length: int, segments: int, order: np.ndarray
) -> int:
    """How many packed batches the epoch visiting the examples in `order` takes."""
    steps = offset = 0
    while offset < len(order):
        rows = pack_rows(encoded, order[offset:], batch_size, row_length, segments)
        offset += sum(map(len, rows))
        steps += 1
    return steps


def iterate_batches(
    encoded: Sequence[Encoded],
    batch_size: int,
    buckets: Sequence[int],
    pad_id: int,
    seed: int,
    start: DataPosition = DataPosition(),
    segments: int = 0,
) -> Iterator[tuple[dict[str, np.ndarray], DataPosition]]:
    """Endless stream of (batch, position after it), epoch after epoch, from `start`.

    Saving the position that came with a batch and passing it back as `start` continues with
    the next batch. An epoch ends with a partial batch rather than borrowing from the next one.
    `pad_id` may be any id: padding is masked out. `segments` > 0 packs up to that many
    examples into each row of `buckets[-1]` tokens (`collate_packed`).
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
            if segments:
                rows = pack_rows(encoded, order[offset:], batch_size, buckets[-1], segments)
                batch = collate_packed(encoded, rows, batch_size, segments, buckets, pad_id)
                offset += sum(map(len, rows))
            else:
                indices = order[offset : offset + batch_size]
                batch = collate(encoded, indices, batch_size, buckets, pad_id)
                offset += len(indices)
            position = DataPosition(epoch, offset) if offset < n else DataPosition(epoch + 1, 0)
            yield batch, position
        epoch, offset = epoch + 1, 0
