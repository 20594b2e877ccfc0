"""Tiny, offline stand-ins for the real tokenizer and S-Encoder, for tests and demos.

Everything here is built from constants in a fraction of a second, needs no download, and is
deterministic, so tests in different files (formatting, a tiny backbone, the encoder cache) can
share one vocabulary.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from lisendiff_jax.tiny import train_chat_tokenizer

# Training text for the merges: a few lines in each language the project touches, so common
# words become single tokens while any other text still encodes through the byte alphabet.
_CORPUS = (
    "Hello, how are you today?",
    "I feel so sad because my dog is sick.",
    "That sounds really hard. I am sorry to hear that.",
    "I passed my exam and I am very happy!",
    "Congratulations, you must be proud of yourself.",
    "What do you want to talk about?",
    "system user assistant",
    "今日はとても疲れました。",
    "それは大変でしたね。ゆっくり休んでください。",
    "我今天很难过，因为考试没有考好。",
    "听起来你真的很失落，我明白你的感受。",
    "我今日好攰，唔想返工。",
    "聽落真係好辛苦，你要好好休息吓。",
)
TINY_VOCAB_SIZE = 512


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A 512-token byte-level BPE with Llama-3-style control tokens and chat template."""
    return train_chat_tokenizer(_CORPUS, TINY_VOCAB_SIZE)


def save_tiny_sentence_transformer(path: str | Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """Write a randomly initialised one-layer BERT sentence-transformer (mean pooling) to `path`.

    The result loads with `SentenceTransformer(path)` or `make_encoder(path)`; the same `seed`
    and `hidden_size` give the same weights. Returns the path.
    """
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    path = Path(path)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    # sentence-transformers builds its Transformer module from a Hugging Face directory only.
    with tempfile.TemporaryDirectory() as backbone_dir:
        BertModel(config).save_pretrained(backbone_dir)
        tokenizer.save_pretrained(backbone_dir)
        transformer = models.Transformer(backbone_dir, max_seq_length=64)
        pooling = models.Pooling(hidden_size, "mean")
        SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(path))
    return path
