"""Training: the optimizer and jitted step (`step`), how updates land on bf16 weights
(`rounding`), and the run with its data, checkpoints and logs (`loop`)."""
