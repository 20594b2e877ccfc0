"""Replies from a restored model: each request's randomness is its own, whatever its batch."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lisendiff_jax.backbone.generate import Generation
from lisendiff_jax.infer import inference
from lisendiff_jax.infer.inference import InputError, Listener, Options, Request
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
    assert listener._pad([listener._encode(r, 8) for r in COMPANIONS])["input_ids"].shape[1] > 32


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


def test_sampling_settings_are_values_of_one_compiled_program(listener):
    """max_tokens (within a block), temperature and top_p do not each cost a compile, as a
    server's clients each send their own; they still act."""
    request = [Request(TARGET.context, seed=5)]
    listener.reply(request, HOT)
    compiled = inference._respond._cache_size()
    greedy = listener.reply(request, Options(temperature=0.0, max_tokens=8))[0]
    narrowest = listener.reply(request, Options(temperature=1.0, top_p=1e-6, max_tokens=8))[0]
    short = listener.reply(request, Options(temperature=0.0, max_tokens=3))[0]
    assert inference._respond._cache_size() == compiled
    assert greedy.text == narrowest.text  # top_p near 0 keeps the likeliest token only
    assert greedy.text.startswith(short.text) and len(short.text) < len(greedy.text)


def test_prompt_widths_double_up_to_the_budget():
    widths = [inference.prompt_width(n, 2048) for n in range(1, 2049)]
    assert sorted(set(widths)) == [32, 64, 128, 256, 512, 1024, 2048]
    assert all(w >= n for n, w in enumerate(widths, 1))
    # A budget that is no power of two caps the widths at itself, rounded up to 32.
    widths = [inference.prompt_width(n, 200) for n in (1, 33, 65, 129, 200)]
    assert widths == [32, 64, 128, 224, 224]


def test_prompts_of_one_width_share_a_compiled_program(listener):
    """Prompts of 129-160 and 225-256 tokens (two shapes when widths were multiples of 32)
    are padded to one width: the second costs no compile."""
    turns = [tuple(f"This is turn {i} of a long story." for i in range(n)) for n in range(1, 12)]
    by_length = {len(listener._encode(Request(t), 8).input_ids): t for t in turns}

    def of_length(low: int, high: int) -> tuple[str, ...]:
        found = [t for n, t in by_length.items() if low <= n <= high]
        assert found, f"no prompt of {low}-{high} tokens; lengths: {sorted(by_length)}"
        return found[0]

    middle, upper = of_length(129, 160), of_length(225, 256)
    listener.reply([Request(middle, seed=1)], HOT)
    compiled = inference._respond._cache_size()
    listener.reply([Request(upper, seed=1)], HOT)
    assert inference._respond._cache_size() == compiled


def test_max_tokens_past_the_context_is_refused_in_the_requests_terms(listener, monkeypatch):
    context = listener.max_positions
    with pytest.raises(InputError) as refused:
        listener.check(TARGET, Options(max_tokens=context - 6))
    found = re.fullmatch(
        rf"max_tokens {context - 6} leaves no room for the (\d+)-token prompt in this model's "
        rf"{context}-token context; use max_tokens <= (\d+)",
        str(refused.value),
    )
    assert found, str(refused.value)
    prompt, largest = map(int, found.groups())
    assert prompt == len(listener._encode(TARGET, 1).input_ids) and largest == context - prompt
    listener.check(TARGET, Options(max_tokens=largest))  # the advice holds, to the token
    with pytest.raises(InputError):
        listener.check(TARGET, Options(max_tokens=largest + 1))

    def run_model(*args, **kwargs):
        raise AssertionError("the model ran")

    # A call with one such request stops before the model runs for any of them.
    monkeypatch.setattr(inference, "_respond", run_model)
    with pytest.raises(InputError, match="leaves no room"):
        listener.reply([COMPANIONS[0], TARGET], Options(max_tokens=largest + 1), batch_size=1)


def test_a_reply_cut_inside_a_character_loses_the_cut_character(listener):
    encode = lambda text: listener.tokenizer.encode(text, add_special_tokens=False)
    start, emoji, end = encode("我很"), encode("😀"), encode("好")
    assert len(emoji) > 1  # the byte-level tokenizer spells the emoji in several byte tokens
    assert listener.tokenizer.decode(start + emoji[:-1]).endswith("\ufffd")
    rows = [
        start + emoji[:-1],  # max_tokens cut the emoji: its bytes so far go
        start + emoji[:1],
        start + emoji[:-1] + end,  # invalid bytes the model wrote mid-text stay
        start + emoji,
    ]
    width = max(map(len, rows))
    tokens = np.array([r + [listener.pad_id] * (width - len(r)) for r in rows])
    texts = listener._texts(Generation(tokens, np.array([len(r) for r in rows])))
    assert texts == ["我很", "我很", "我很\ufffd好", "我很😀"]
