"""BaseLLM+L2 baseline on Qwen2-7B: LoRA only, no LisenDiff modules.

Same data, LoRA and training settings as configs/qwen_ja.py
(L2 = Japanese: J-DailyDialog 10%, J-EmpatheticDialogues 20%).
"""

from lisendiff_jax.config import paper_config


def get_config():
    return paper_config("Qwen/Qwen2-7B", "ja", lisendiff=False)
