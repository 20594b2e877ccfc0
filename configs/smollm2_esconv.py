"""LisenDiff on SmolLM2-135M-Instruct and ESConv: the smallest real reproduction, sized for a
2-core CPU (about 20 minutes of training; experiments/README.md has the whole experiment).

ESConv in the JSONL dialogue format (docs/data.md), and the backbone by hub id or as a local
folder (e.g. one converted from GGUF, see the README):
    python train.py --config configs/smollm2_esconv.py --workdir runs/smollm2_esconv \\
        --config.data.sources.esconv.path=/data/esconv/esconv_dev.jsonl \\
        --config.model.backbone=/tmp/smollm2
"""

from lisendiff_jax.experiments.configs import smollm2_esconv


def get_config():
    return smollm2_esconv()
