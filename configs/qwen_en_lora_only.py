"""BaseLLM+L2 baseline on Qwen2-7B: LoRA only, no LisenDiff modules.

Same data, LoRA and training settings as configs/qwen_en.py
(L2 = English: DailyDialog 3%, ESConv 10%).
"""

from lisendiff_jax.config import paper_config


def get_config():
    return paper_config("Qwen/Qwen2-7B", "en", lisendiff=False)
