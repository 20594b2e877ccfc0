"""Experiments that train and evaluate several runs end to end (`small_real`)."""
