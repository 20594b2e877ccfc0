"""A tiny workdir for the sampling and export tests (the `tiny_workdir` fixture in conftest.py
builds one per session), and the four dialogues the training tests use too."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from lisendiff_jax.config import load_config
from lisendiff_jax.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
DIALOGUES = [
    ("empathy", ["I lost my job today.", "Oh no, what happened?", "They closed my office."]),
    ("empathy", ["My cat is sick.", "I'm so sorry.", "The vet says she will be fine."]),
    ("default", ["What's for dinner?", "Pasta, I think.", "Great, I love pasta."]),
    ("default", ["Is the train late?", "Ten minutes, they said.", "Then let's get tea."]),
]


def write_dialogues(path: Path) -> Path:
    """DIALOGUES in our JSONL format (English, speakers A and B taking turns)."""
    with open(path, "w") as f:
        for i, (style, turns) in enumerate(DIALOGUES):
            speakers = [{"speaker": "AB"[j % 2], "text": t} for j, t in enumerate(turns)]
            record = {"id": f"d{i}", "lang": "en", "style": style, "turns": speakers}
            f.write(json.dumps(record) + "\n")
    return path


def make_tiny_workdir(folder: Path, lisendiff: bool = True) -> Path:
    """The embedded default set up on four short dialogues and checkpointed at step 0, with
    every trainable parameter moved by seeded noise instead of by training: LoRA B and the
    cross-attention outputs leave zero, so merging and the latent both matter, and no train
    step has to compile. Returns `folder`."""
    folder.mkdir(parents=True)
    data = write_dialogues(folder.parent / f"{folder.name}-dialogues.jsonl")
    c = load_config(ROOT / "configs" / "tiny.py")
    for name in list(c.data.sources):
        del c.data.sources[name]
    c.data.sources.mine = dict(format="jsonl", path=str(data), fraction=1.0, split="")
    c.model.lisendiff = lisendiff
    trainer = Trainer(c, folder, progress=False)
    rng = np.random.RandomState(0)
    trainer.trainable = jax.tree.map(
        lambda x: x + 0.02 * rng.standard_normal(x.shape).astype(x.dtype), trainer.trainable
    )
    trainer.save()
    trainer.close()
    return folder
