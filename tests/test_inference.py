"""Replies from a restored model: each request's randomness is its own, whatever its batch."""

from __future__ import annotations

import numpy as np
import pytest

from lisendiff_jax.infer.inference import Listener, Options, Request
from lisendiff_jax.infer.restore import load_workdir

HOT = Options(temperature=1.0, top_p=1.0, max_tokens=8)  # every token is drawn
TARGET = Request(("I lost my job today.", "Oh no!", "They closed my office."), seed=5)
COMPANIONS = [
    Request(("My cat is sick.",), style="default", seed=1),
    Request(tuple(f"This is turn {i} of a long story." for i in range(6)), lang="yue", seed=2),
    Request(("Is the train late?", "Ten minutes."), seed=5),  # the target's seed, other words
]


@pytest.fixture(scope="module")
def listener(tiny_workdir) -> Listener:
    return Listener(*load_workdir(tiny_workdir, dtype="float32"))


def same(a, b) -> None:
    assert a.text == b.text
    np.testing.assert_allclose(a.latent, b.latent, atol=1e-5, rtol=1e-5)


def test_a_reply_is_the_same_alone_and_in_any_batch(listener):
    alone = listener.reply([TARGET], HOT)[0]
    first = listener.reply([TARGET, *COMPANIONS], HOT)[0]
    among = listener.reply([COMPANIONS[1], COMPANIONS[0], TARGET, COMPANIONS[2]], HOT)[2]
    split = listener.reply([*COMPANIONS, TARGET], HOT, batch_size=2)[3]
    for reply in (first, among, split):
        same(alone, reply)
    # The long companion widens the shared prompt: the target is padded, and still the same.
    assert listener._prompts(COMPANIONS, 256)[0]["input_ids"].shape[1] > 32


def test_requests_without_a_seed_draw_by_position_in_the_call(listener):
    options = Options(seed=7, temperature=1.0, top_p=1.0, max_tokens=8)
    unseeded = [Request(r.context, r.style, r.lang) for r in COMPANIONS]
    whole = listener.reply(unseeded, options)
    for a, b in zip(whole, listener.reply(unseeded, options, batch_size=1), strict=True):
        same(a, b)
    same(whole[0], listener.reply(unseeded[:1], options)[0])
    # The first request of a call with seed 7 draws as a request with its own seed 7 does.
    seeded = Request(unseeded[0].context, unseeded[0].style, unseeded[0].lang, seed=7)
    same(whole[0], listener.reply([seeded], HOT)[0])


def test_different_seeds_give_different_replies(listener):
    replies = [listener.reply([Request(TARGET.context, seed=s)], HOT)[0] for s in range(4)]
    assert len({r.text for r in replies}) == 4
    assert len({r.latent.tobytes() for r in replies}) == 4
