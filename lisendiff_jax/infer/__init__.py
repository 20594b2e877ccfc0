"""Inference: a trained model restored from its workdir or export (`restore`), replies sampled
from it (`inference`), and the conversation front end that `sample.py` and the server share
(`chat`). Nothing here imports training."""
