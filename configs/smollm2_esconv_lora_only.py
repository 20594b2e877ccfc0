"""BaseLLM+ESConv baseline on SmolLM2-135M-Instruct: LoRA only, no LisenDiff modules.

Same data, LoRA, learning rate, steps and seed as configs/smollm2_esconv.py.
"""

from lisendiff_jax.experiments.configs import smollm2_esconv


def get_config():
    return smollm2_esconv(lisendiff=False)
