"""Tiny, offline stand-ins for the real tokenizer and S-Encoder, for tests and demos.

Everything here is built from constants in a fraction of a second, needs no download, and is
deterministic, so tests in different files (formatting, a tiny backbone, the encoder cache) can
share one vocabulary.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from transformers import PreTrainedTokenizerFast

# The control tokens of a Llama-3-style chat format. The pad token comes first so that it gets
# id 0, which a tiny model's embedding table can treat like any other row.
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
END_OF_TURN_TOKEN = "<|eot_id|>"
SPECIAL_TOKENS = (
    PAD_TOKEN,
    BOS_TOKEN,
    EOS_TOKEN,
    "<|start_header_id|>",
    "<|end_header_id|>",
    END_OF_TURN_TOKEN,
)

# Llama-3 layout: a header per turn, content trimmed, each turn closed by <|eot_id|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

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
    """A byte-level BPE tokenizer with Llama-3-style special tokens and chat template.

    Byte-level, so any string (English, Japanese, Chinese, emoji) encodes without unknown
    tokens; `len(tokenizer)` is at most TINY_VOCAB_SIZE.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=END_OF_TURN_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


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
