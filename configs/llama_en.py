"""LisenDiff+L2 on Llama-3.1-8B-Instruct (the paper's setting).

L2 = English: DailyDialog 3%, ESConv 10%.
Point each source at the original corpus:
    python train.py --config configs/llama_en.py --workdir runs/llama_en \\
        --config.data.sources.daily_dialog.path=/data/daily_dialog \\
        --config.data.sources.esconv.path=/data/esconv
"""

from lisendiff_jax.config import paper_config


def get_config():
    return paper_config("meta-llama/Llama-3.1-8B-Instruct", "en")
