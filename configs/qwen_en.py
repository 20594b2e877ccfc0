"""LisenDiff+L2 on Qwen2-7B (the paper's setting).

L2 = English: DailyDialog 3%, ESConv 10%.
Point each source at the original corpus:
    python train.py --config configs/qwen_en.py --workdir runs/qwen_en \\
        --config.data.sources.daily_dialog.path=/data/daily_dialog \\
        --config.data.sources.esconv.path=/data/esconv
"""

from lisendiff_jax.config import paper_config


def get_config():
    return paper_config("Qwen/Qwen2-7B", "en")
