"""Trained on a German corpus in our JSONL format, replying in Korean (Llama-3.1-8B-Instruct
with the paper's settings, configs/llama_ja_ko.py with German dialogues for the Japanese).

No reader is German-specific: the `jsonl` reader takes dialogues in any language, each line
tagged "lang": "de" (docs/data.md). German and Korean have no built-in system prompt; both
come from configs/prompts.json (each German example is encoded with the German prompt, as
`data.train_prompt="example"` asks).
    python train.py --config configs/llama_de_ko.py --workdir runs/llama_de_ko \\
        --config.data.sources.de.path=/data/de_dialogues.jsonl
"""

from pathlib import Path

from lisendiff_jax.config import paper_config, source

PROMPTS = Path(__file__).resolve().parent / "prompts.json"


def get_config():
    c = paper_config("meta-llama/Llama-3.1-8B-Instruct", "ja")
    c.name = "llama-3.1-8b-instruct_de_ko"
    for name in list(c.data.sources):
        del c.data.sources[name]
    c.data.sources.de = source("jsonl", "data/de_dialogues.jsonl", 1.0)
    c.data.target_lang = "ko"
    c.data.prompts = str(PROMPTS)
    return c
