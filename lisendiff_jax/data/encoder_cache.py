"""Embeddings computed once per (encoder, text), and per-split arrays that training reads.

Two layers on disk:

1. The text cache, shared by every split and run:
   `<cache_dir>/<sha256(encoder identity)[:16]>/embeddings.sqlite`, table `vectors` (key = the
   32-byte sha256 of the UTF-8 text, vector = `dim` float32 bytes) and table `meta` (the full
   identity and dim, checked on every open). Each encoded batch is committed in its own
   transaction, so a run that dies keeps every finished batch and sqlite's journal keeps the
   file consistent; a rerun encodes only what is missing. WAL mode lets readers and a second
   filler work at the same time.

2. A split: the vectors one list of examples needs, aligned with it, in `<split_dir>/`:
   `vectors.npy` [texts, d] float32 (each distinct text of the split once), `response_index.npy`
   [N] int32, `context_index.npy` [N, max_context] int32, `context_mask.npy` [N, max_context]
   bool, `style_id.npy` [N] int32, and `meta.json`. Context slots hold the newest
   `max_context` turns, oldest first, padded at the end. Contexts of one dialogue share their
   turns, so indices into a table of distinct texts are much smaller than [N, max_context, d].
   `meta.json` is removed before and written after the arrays: when it is there, the arrays
   are complete. It records the encoder identity and a fingerprint of the examples, so a
   changed example list or encoder is rebuilt rather than reused. Arrays load memory-mapped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm.auto import tqdm

from lisendiff_jax.data.encoder import Encoder
from lisendiff_jax.data.example import STYLES, Example

SPLIT_FORMAT = 1
_SPLIT_ARRAYS = ("vectors", "response_index", "context_index", "context_mask", "style_id")
# sqlite's default limit on bound parameters is 999 in older builds.
_QUERY_CHUNK = 900


def text_key(text: str) -> bytes:
    """The cache key of a text: sha256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def identity_dir(cache_dir: str | Path, identity: str) -> Path:
    """The folder that holds one encoder's vectors."""
    return Path(cache_dir) / hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]


class EmbeddingCache:
    """The sqlite store of one encoder's vectors; use as a context manager."""

    def __init__(self, cache_dir: str | Path, identity: str, dim: int) -> None:
        folder = identity_dir(cache_dir, identity)
        folder.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self._db = sqlite3.connect(folder / "embeddings.sqlite", timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL still survives a crashed process; it may only lose the newest
        # batches on power loss, which a rerun re-encodes.
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vector BLOB NOT NULL)"
            )
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('identity', ?), ('dim', ?)", (identity, dim)
            )
        stored = dict(self._db.execute("SELECT name, value FROM meta"))
        if stored["identity"] != identity or int(stored["dim"]) != dim:
            self.close()
            raise ValueError(
                f"cache folder {folder} belongs to {stored['identity']!r} (dim {stored['dim']}), "
                f"not {identity!r} (dim {dim})"
            )

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]

    def _rows(self, keys: Sequence[bytes]) -> Iterator[tuple[bytes, bytes]]:
        for start in range(0, len(keys), _QUERY_CHUNK):
            chunk = keys[start : start + _QUERY_CHUNK]
            marks = ",".join("?" * len(chunk))
            yield from self._db.execute(
                f"SELECT key, vector FROM vectors WHERE key IN ({marks})", chunk
            )

    def missing(self, keys: Sequence[bytes]) -> list[bytes]:
        """The keys (in the given order, repeats kept) that have no vector yet."""
        present = {key for key, _ in self._rows(list(dict.fromkeys(keys)))}
        return [key for key in keys if key not in present]

    def get(self, keys: Sequence[bytes]) -> np.ndarray:
        """Vectors [len(keys), dim] float32; KeyError if any is missing."""
        found = dict(self._rows(list(dict.fromkeys(keys))))
        out = np.empty((len(keys), self.dim), np.float32)
        for row, key in enumerate(keys):
            if key not in found:
                raise KeyError(f"no cached vector for text key {key.hex()}")
            out[row] = np.frombuffer(found[key], np.float32)
        return out

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Store vectors [len(keys), dim] in one transaction."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(f"expected vectors {(len(keys), self.dim)}, got {vectors.shape}")
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO vectors VALUES (?, ?)",
                zip(keys, (row.tobytes() for row in vectors), strict=True),
            )


def fill_cache(
    encoder: Encoder,
    texts: Iterable[str],
    cache_dir: str | Path,
    batch_size: int = 256,
    progress: bool = True,
) -> int:
    """Encode every distinct text the cache lacks, committing batch by batch.

    Returns how many texts were encoded (0 when all were cached).
    """
    by_key = {text_key(text): text for text in texts}
    with EmbeddingCache(cache_dir, encoder.identity, encoder.dim) as cache:
        # Similar lengths in one batch waste less padding in transformer encoders.
        todo = sorted((by_key[key] for key in cache.missing(list(by_key))), key=len)
        with tqdm(total=len(todo), desc="encoding", unit="text", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                cache.put([text_key(text) for text in batch], encoder.encode(batch))
                bar.update(len(batch))
    return len(todo)


def embed_texts(
    encoder: Encoder,
    texts: Sequence[str],
    cache_dir: str | Path,
    batch_size: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings [len(texts), dim] float32 through the cache, encoding only what is missing."""
    fill_cache(encoder, texts, cache_dir, batch_size, progress)
    with EmbeddingCache(cache_dir, encoder.identity, encoder.dim) as cache:
        return cache.get([text_key(text) for text in texts])


@dataclasses.dataclass(frozen=True)
class EmbeddedSplit:
    """What training needs per example besides tokens, aligned with the example list."""

    vectors: np.ndarray  # [texts, d] float32
    response_index: np.ndarray  # [N] int32, row of the response in `vectors`
    context_index: np.ndarray  # [N, max_context] int32, rows of the newest turns, oldest first
    context_mask: np.ndarray  # [N, max_context] bool, False on padding slots
    style_id: np.ndarray  # [N] int32, index into STYLES
    meta: Mapping[str, object]

    def __len__(self) -> int:
        return len(self.response_index)

    def take(self, example_index: np.ndarray) -> dict[str, np.ndarray]:
        """Per-example arrays for a batch of example indices [batch] (or [batch, K], a packed
        batch's segments: every array below then has K after batch).

        response_latent [batch, 1, d] (a latent set of one vector), context_embeddings
        [batch, max_context, d] (zero on padding slots), context_mask [batch, max_context]
        bool, style_id [batch] int32.
        """
        mask = np.asarray(self.context_mask[example_index])
        context = self.vectors[self.context_index[example_index]] * mask[..., None]
        return {
            "response_latent": self.vectors[self.response_index[example_index]][..., None, :],
            "context_embeddings": context.astype(np.float32),
            "context_mask": mask,
            "style_id": np.asarray(self.style_id[example_index]),
        }

    @property
    def response_latents(self) -> np.ndarray:
        """[N, 1, d] float32."""
        return self.take(np.arange(len(self)))["response_latent"]

    @property
    def context_embeddings(self) -> np.ndarray:
        """[N, max_context, d] float32, zero on padding slots."""
        return self.take(np.arange(len(self)))["context_embeddings"]


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """sha256 over every example's context, response and style, in order."""
    digest = hashlib.sha256()
    for example in examples:
        record = [example.style, example.response, list(example.context)]
        digest.update(json.dumps(record, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _split_meta(examples: Sequence[Example], identity: str, max_context: int) -> dict:
    return {
        "format": SPLIT_FORMAT,
        "examples": examples_fingerprint(examples),
        "num_examples": len(examples),
        "encoder_identity": identity,
        "max_context": max_context,
    }


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file and rename it over `path`, so readers never see half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _split_arrays(
    examples: Sequence[Example], max_context: int
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Distinct texts of the split and the index arrays into them."""
    rows: dict[str, int] = {}

    def row(text: str) -> int:
        return rows.setdefault(text, len(rows))

    n = len(examples)
    response_index = np.array([row(ex.response) for ex in examples], np.int32)
    context_index = np.zeros((n, max_context), np.int32)
    context_mask = np.zeros((n, max_context), bool)
    for i, example in enumerate(examples):
        newest = example.context[len(example.context) - max_context :]
        context_index[i, : len(newest)] = [row(text) for text in newest]
        context_mask[i, : len(newest)] = True
    style_id = np.array([STYLES.index(ex.style) for ex in examples], np.int32)
    arrays = {
        "response_index": response_index,
        "context_index": context_index,
        "context_mask": context_mask,
        "style_id": style_id,
    }
    return list(rows), arrays


def prepare_split(
    examples: Sequence[Example],
    encoder: Encoder,
    cache_dir: str | Path,
    split_dir: str | Path,
    max_context: int,
    batch_size: int = 256,
    progress: bool = True,
) -> EmbeddedSplit:
    """Fill the text cache for `examples` and write their split arrays, unless already there.

    A split folder written for the same examples, encoder and `max_context` is loaded as is.
    """
    split_dir = Path(split_dir)
    meta = _split_meta(examples, encoder.identity, max_context)
    meta_path = split_dir / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        return load_split(split_dir)
    texts, arrays = _split_arrays(examples, max_context)
    arrays["vectors"] = embed_texts(encoder, texts, cache_dir, batch_size, progress)
    split_dir.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    for name in _SPLIT_ARRAYS:
        _atomic_write(split_dir / f"{name}.npy", lambda f, a=arrays[name]: np.save(f, a))
    _atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return load_split(split_dir)


def load_split(
    split_dir: str | Path, examples: Sequence[Example] | None = None, mmap: bool = True
) -> EmbeddedSplit:
    """Load a prepared split, memory-mapped by default.

    With `examples`, check that the split was prepared for exactly that list.
    """
    split_dir = Path(split_dir)
    meta_path = split_dir / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no complete split in {split_dir}; run prepare_split first")
    meta = json.loads(meta_path.read_text())
    if meta["format"] != SPLIT_FORMAT:
        raise ValueError(f"split format {meta['format']} in {split_dir}, expected {SPLIT_FORMAT}")
    if examples is not None and examples_fingerprint(examples) != meta["examples"]:
        raise ValueError(f"split in {split_dir} was prepared for a different list of examples")
    mode = "r" if mmap else None
    arrays = {name: np.load(split_dir / f"{name}.npy", mmap_mode=mode) for name in _SPLIT_ARRAYS}
    return EmbeddedSplit(**arrays, meta=meta)
