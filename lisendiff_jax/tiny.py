"""The embedded default's backbone: a tiny Llama and its tokenizer, made offline on first use.

The tokenizer is a byte-level BPE trained on the bundled sample dialogues (English, Japanese,
Mandarin, Cantonese) with Llama-3-style control tokens and chat template; the model is a
randomly initialised Llama written by transformers, so it loads exactly like a hub checkpoint.
Both are deterministic and cached, so every run of the default sees the same backbone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from lisendiff_jax.backbone.loading import resolve_checkpoint
from lisendiff_jax.backbone.presets import LLAMA_TINY
from lisendiff_jax.config import TINY_BACKBONE
from lisendiff_jax.files import staged_folder

# Control tokens of a Llama-3-style chat format; the pad token first so it gets id 0.
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

# Bump when what `build_tiny_backbone` writes changes, so stale caches are not reused.
TINY_VERSION = "v1"
TINY_VOCAB_SIZE = 2048


def train_chat_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the control tokens and chat template above.

    Byte-level, so any string encodes without unknown tokens; `len(tokenizer) <= vocab_size`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=END_OF_TURN_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def _sample_texts() -> list[str]:
    from lisendiff_jax.data import load_pairs, load_situations, sample_path
    from lisendiff_jax.data.formatting import SYSTEM_PROMPTS

    texts = list(SYSTEM_PROMPTS.values())
    for fmt in ("daily_dialog", "empathetic_dialogues", "esconv", "j_daily_dialog"):
        for example in load_pairs(fmt, sample_path(fmt)):
            texts.append(example.response)
    for example in load_pairs("j_empathetic_dialogues", sample_path("j_empathetic_dialogues")):
        texts.append(example.response)
    for name in ("zh_mandarin.jsonl", "zh_cantonese.jsonl"):
        texts.extend(s.situation for s in load_situations(sample_path(f"situations/{name}")))
    for example in load_pairs("jsonl", sample_path("jsonl")):
        texts.append(example.response)
    return texts


def default_cache_root() -> Path:
    return Path(os.environ.get("LISENDIFF_CACHE", Path.home() / ".cache" / "lisendiff_jax"))


def build_tiny_backbone(folder: Path, seed: int = 0) -> Path:
    """Writes the tiny tokenizer and random Llama to `folder` (replaced atomically)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_chat_tokenizer(_sample_texts(), TINY_VOCAB_SIZE)
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    config = LlamaConfig(
        **LLAMA_TINY,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[eot, tokenizer.convert_tokens_to_ids(EOS_TOKEN)],
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with staged_folder(folder, replace=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return folder


def tiny_backbone_path(cache_root: Path | None = None) -> Path:
    """The tiny backbone's folder, built on first use."""
    folder = (cache_root or default_cache_root()) / f"tiny-llama-{TINY_VERSION}"
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        build_tiny_backbone(folder)
    return folder


def backbone_folder(name: str) -> Path:
    """The checkpoint folder for `model.backbone` ("tiny" is built offline on first use)."""
    return tiny_backbone_path() if name == TINY_BACKBONE else resolve_checkpoint(name)
