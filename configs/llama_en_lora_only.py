"""BaseLLM+L2 baseline on Llama-3.1-8B-Instruct: LoRA only, no LisenDiff modules.

Same data, LoRA and training settings as configs/llama_en.py
(L2 = English: DailyDialog 3%, ESConv 10%).
"""

from lisendiff_jax.config import paper_config


def get_config():
    return paper_config("meta-llama/Llama-3.1-8B-Instruct", "en", lisendiff=False)
