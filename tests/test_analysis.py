"""Latent-space analysis: retrieval by summed cosine similarity, the t-SNE map, the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from lisendiff_jax.analysis import main, plot_latent_map, retrieval_scores, top_k, tsne_points
from lisendiff_jax.errors import UserError


def test_retrieval_ranks_by_summed_cosine_similarity():
    latents = np.array([[1.0, 0.0], [0.6, 0.8]])
    candidates = np.array([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])
    # cosines: (1, 0.6), (0, 0.8), (-1, -0.6): sums 1.6, 0.8, -1.6, whatever the lengths.
    np.testing.assert_allclose(retrieval_scores(latents, candidates), [1.6, 0.8, -1.6])
    assert top_k(["a", "b", "c"], np.array([1.6, 0.8, -1.6]), 2) == [("a", 1.6), ("b", 0.8)]


def test_tsne_map_is_written(tmp_path):
    rng = np.random.RandomState(0)
    latents = np.concatenate([rng.randn(10, 8) + 5, rng.randn(10, 8) - 5])
    points = tsne_points(latents)
    assert points.shape == (20, 2) and np.isfinite(points).all()
    # Two far-apart clusters stay apart on the map.
    gap = np.linalg.norm(points[:10].mean(0) - points[10:].mean(0))
    assert gap > np.linalg.norm(points[:10].std(0))
    out = plot_latent_map(
        points, ["ja"] * 10 + ["en"] * 10, ["empathy", "default"] * 10, tmp_path / "map.png"
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="at least 3 latents"):
        tsne_points(latents[:2])


def test_retrieve_command_on_a_workdir(tiny_workdir, tmp_path, capsys):
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("I'm so sorry to hear that.\nThe train leaves at six.\n")
    args = ["retrieve", "--workdir", str(tiny_workdir), "--candidates", str(candidates)]
    assert main([*args, "--samples", "1", "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count(f"{tiny_workdir} / ") == 2  # one block per style
    assert main([*args[:3], "--candidates", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt: no such file" in capsys.readouterr().err
