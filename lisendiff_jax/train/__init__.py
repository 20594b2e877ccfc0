"""Training: the optimizer and jitted step (`step`), and the run with its data, checkpoints and
logs (`loop`)."""
