"""Latent-space analysis: retrieval by summed cosine similarity, the t-SNE map, the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from lisendiff_jax import analysis
from lisendiff_jax.analysis import main, plot_latent_map, retrieval_scores, top_k, tsne_points
from lisendiff_jax.data import STYLES, load_situations, sample_path
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


class KnownEmbeddings:
    """An encoder that embeds each candidate text as a vector the test chose."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def encode(self, texts):
        return np.stack([self.table[t] for t in texts])


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


ANGLES = (0, 25, 60, 100, 150)  # degrees from the best direction
LENGTHS = (0.5, 4.0, 1.0, 2.5, 0.2)  # per angle: the ranking must not follow them


def test_retrieve_ranks_a_constructed_case(tiny_workdir, tmp_path, capsys, monkeypatch):
    """Per style, the candidate direction with the largest summed cosine to the sampled
    latents u_i is S = sum_i u_i / |u_i|, scoring |S|; one at angle a from S scores
    |S| cos a. Candidates are built at known angles from each style's S, so each style's
    block must rank its own candidates by angle, with those scores, its best one first."""
    sums, table = {}, {}
    real_sampled_latents = analysis.sampled_latents

    def sample_then_embed_known(listener, situations, samples, seed, empathy=None):
        sampled = real_sampled_latents(listener, situations, samples, seed, empathy)
        rng = np.random.RandomState(0)
        for style, latents in sampled.items():
            sums[style] = unit(latents).sum(axis=0)
            best = unit(sums[style])
            other = rng.randn(best.size)
            other = unit(other - (other @ best) * best)  # orthogonal to S
            for angle, length in zip(ANGLES, LENGTHS, strict=True):
                a = np.deg2rad(angle)
                table[f"{style} at {angle} degrees"] = length * (
                    np.cos(a) * best + np.sin(a) * other
                )
        listener.encoder = KnownEmbeddings(table)
        return sampled

    monkeypatch.setattr(analysis, "sampled_latents", sample_then_embed_known)
    texts = [f"{style} at {angle} degrees" for style in STYLES for angle in ANGLES]
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("\n".join(np.random.RandomState(1).permutation(texts)) + "\n")
    args = ["retrieve", "--workdir", str(tiny_workdir), "--candidates", str(candidates)]
    assert main([*args, "--samples", "1", "--top-k", str(len(texts))]) == 0

    blocks: dict[str, list[tuple[float, str]]] = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith(f"{tiny_workdir} / "):
            style = line.split(" / ")[-1].rstrip(":")
            blocks[style] = []
        else:
            score, text = line.split(maxsplit=1)
            blocks[style].append((float(score), text))
    assert sorted(blocks) == sorted(STYLES) == sorted(sums)
    for style, ranked in blocks.items():
        assert len(ranked) == len(texts)
        assert ranked[0][1] == f"{style} at 0 degrees"
        own = [(score, text) for score, text in ranked if text.startswith(style)]
        assert [text for _, text in own] == [f"{style} at {a} degrees" for a in ANGLES]
        expected = np.linalg.norm(sums[style]) * np.cos(np.deg2rad(ANGLES))
        np.testing.assert_allclose([score for score, _ in own], expected, rtol=0, atol=1e-3)


def test_dial_positions_measure_along_the_default_to_empathy_line():
    default, empathy = np.array([1.0, 0.0]), np.array([3.0, 0.0])
    latents = np.array([[1.0, 7.0], [2.0, -1.0], [3.0, 0.0], [5.0, 2.0], [0.0, 0.0]])
    np.testing.assert_allclose(
        analysis.dial_positions(latents, default, empathy), [0.0, 0.5, 1.0, 2.0, -0.5]
    )


def test_dial_command_places_each_setting_on_the_runs_empathy_direction(
    tiny_workdir, tmp_path, capsys
):
    args = ["dial", "--workdir", str(tiny_workdir), "--samples", "1", "--empathy", "0,1,2"]
    assert main(args) == 0
    rows = capsys.readouterr().out.splitlines()[3:]
    assert [row.split()[0] for row in rows] == ["0", "1", "2"]
    means = analysis.style_means(tiny_workdir)
    listener, _ = analysis._listener(str(tiny_workdir))
    situations = [
        s.situation for f in analysis.DEFAULT_SITUATIONS for s in load_situations(sample_path(f))
    ]
    at_two = analysis.sampled_latents(listener, situations, 1, 0, [2.0])["w=2"]
    expected = analysis.dial_positions(at_two, means["default"], means["empathy"]).mean()
    assert float(rows[2].split()[1]) == pytest.approx(expected, abs=1e-3)
    with pytest.raises(UserError, match="no training split"):
        analysis.style_means(tmp_path)
