"""Trained on Japanese, replying in Korean: the paper's Japanese setting (configs/llama_ja.py,
Llama-3.1-8B-Instruct) with Korean as the target language.

Korean has no built-in system prompt; its prompt comes from configs/prompts.json (language ->
prompt). The Japanese examples keep the built-in Japanese prompt. Training copies the file's
prompts into the workdir's config.json, so sampling the run needs no file.
    python train.py --config configs/llama_ja_ko.py --workdir runs/llama_ja_ko \\
        --config.data.sources.j_daily_dialog.path=/data/j_daily_dialog \\
        --config.data.sources.j_empathetic_dialogues.path=/data/j_empathetic_dialogues
"""

from pathlib import Path

from lisendiff_jax.config import paper_config

PROMPTS = Path(__file__).resolve().parent / "prompts.json"


def get_config():
    c = paper_config("meta-llama/Llama-3.1-8B-Instruct", "ja")
    c.name = "llama-3.1-8b-instruct_ja_ko"
    c.data.target_lang = "ko"
    c.data.prompts = str(PROMPTS)
    return c
