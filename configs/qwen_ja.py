"""LisenDiff+L2 on Qwen2-7B (the paper's setting).

L2 = Japanese: J-DailyDialog 10%, J-EmpatheticDialogues 20%.
Point each source at the original corpus:
    python train.py --config configs/qwen_ja.py --workdir runs/qwen_ja \\
        --config.data.sources.j_daily_dialog.path=/data/j_daily_dialog \\
        --config.data.sources.j_empathetic_dialogues.path=/data/j_empathetic_dialogues
"""

from lisendiff_jax.config import paper_config


def get_config():
    return paper_config("Qwen/Qwen2-7B", "ja")
