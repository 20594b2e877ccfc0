"""Chat formatting: roles, system prompts, the loss mask and truncation."""

import numpy as np
import pytest
from tokenizers import AddedToken

from lisendiff_jax.data.example import Example
from lisendiff_jax.data.formatting import (
    SYSTEM_PROMPTS,
    chat_messages,
    encode_chat,
    encode_examples,
    system_prompt,
)
from lisendiff_jax.testing import tiny_tokenizer
from lisendiff_jax.tiny import END_OF_TURN_TOKEN

SYSTEM = "Be kind."


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def response_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("turns", [1, 2, 3, 4, 5])
def test_roles_alternate_and_end_with_user_before_reply(turns):
    context = [f"turn {i}" for i in range(turns)]
    messages = chat_messages(context, SYSTEM, "reply")
    roles = [m["role"] for m in messages]
    assert roles[0] == "system" and roles[-1] == "assistant"
    assert roles[-2] == "user"
    assert all(a != b for a, b in zip(roles[1:], roles[2:], strict=False))
    # Odd counts open with the user, even counts with the assistant.
    assert roles[1] == ("user" if turns % 2 else "assistant")
    assert [m["content"] for m in messages[1:-1]] == context


def test_loss_mask_is_exactly_the_response_and_end_of_turn(tokenizer):
    context = ["I lost my keys today.", "Oh no, where did you last see them?", "At the station."]
    response = "That must be stressful. I hope someone hands them in."
    encoded = encode_chat(tokenizer, context, SYSTEM, 512, response)
    ids, mask = encoded.input_ids, encoded.loss_mask
    assert ids.dtype == np.int32 and mask.shape == ids.shape
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    expected = response_ids(tokenizer, response) + [eot]
    assert ids[mask == 1].tolist() == expected
    assert mask[: encoded.prompt_length].sum() == 0
    assert mask[encoded.prompt_length :].all()
    prompt = tokenizer.decode(ids[: encoded.prompt_length])
    assert SYSTEM in prompt and all(turn in prompt for turn in context)
    assert response not in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert encoded.kept_turns == 3 and encoded.shortened == "none"


def test_generation_prompt_has_no_loss_and_ends_with_assistant_header(tokenizer):
    encoded = encode_chat(tokenizer, ["How are you?"], SYSTEM, 512)
    assert encoded.prompt_length == len(encoded.input_ids)
    assert encoded.loss_mask.sum() == 0
    assert tokenizer.decode(encoded.input_ids).endswith("assistant<|end_header_id|>\n\n")


def test_control_tokens_inside_text_stay_plain_text(tokenizer):
    context = ["fake end <|eot_id|> of turn"]
    encoded = encode_chat(tokenizer, context, SYSTEM, 512, "ok <|eot_id|> ok")
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
    # One real end-of-turn each for system, the context turn and the reply.
    assert (encoded.input_ids == eot).sum() == 3


def test_each_language_has_its_own_system_prompt(tokenizer):
    assert {"en", "ja", "zh", "yue"} <= set(SYSTEM_PROMPTS)
    assert len(set(SYSTEM_PROMPTS.values())) == len(SYSTEM_PROMPTS)
    for lang in ("en", "ja", "zh", "yue"):
        encoded = encode_chat(tokenizer, ["hi"], system_prompt(lang), 1024, "hello")
        assert system_prompt(lang) in tokenizer.decode(encoded.input_ids)
    with pytest.raises(ValueError, match=r"^no system prompt for language 'ko' \(Korean\) \(have"):
        system_prompt("ko")
    assert system_prompt("ko", {"ko": "한국어로"}) == "한국어로"


def test_no_system_prompt_leaves_out_the_system_turn(tokenizer):
    assert [m["role"] for m in chat_messages(["hi", "yo"], None, "ok")] == [
        "assistant",
        "user",
        "assistant",
    ]
    encoded = encode_chat(tokenizer, ["hi"], None, 256, "hello")
    text = tokenizer.decode(encoded.input_ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert "system" not in text
    assert tokenizer.decode(encoded.input_ids[encoded.loss_mask == 1]) == "hello<|eot_id|>"


def test_encode_examples_picks_prompt_by_language_or_uses_given_text(tokenizer):
    examples = [
        Example(context=["今日は疲れた。"], response="お疲れさま。", style="empathy", lang="ja"),
        Example(context=["I am tired."], response="Rest a bit.", style="default", lang="en"),
    ]
    by_lang = encode_examples(tokenizer, examples, SYSTEM_PROMPTS, 1024, progress=False)
    for example, encoded in zip(examples, by_lang, strict=True):
        text = tokenizer.decode(encoded.input_ids)
        assert SYSTEM_PROMPTS[example.lang] in text and example.response in text
    custom = encode_examples(tokenizer, examples, "My own prompt.", 1024, progress=False)
    assert all("My own prompt." in tokenizer.decode(e.input_ids) for e in custom)
    bare = encode_examples(tokenizer, examples, None, 1024, progress=False)
    assert not any("system" in tokenizer.decode(e.input_ids) for e in bare)
    with pytest.raises(ValueError, match="language 'ja'"):
        encode_examples(tokenizer, examples, {"en": SYSTEM}, 1024, progress=False)


def test_truncation_drops_oldest_turns_and_keeps_roles(tokenizer):
    context = [f"turn number {i} says something" for i in range(8)]
    response = "a reply"
    full = encode_chat(tokenizer, context, SYSTEM, 4096, response)
    limit = len(full.input_ids) - 5
    encoded = encode_chat(tokenizer, context, SYSTEM, limit, response)
    assert len(encoded.input_ids) <= limit
    assert 1 <= encoded.kept_turns < len(context) and encoded.shortened == "none"
    text = tokenizer.decode(encoded.input_ids)
    kept = context[len(context) - encoded.kept_turns :]
    assert all(turn in text for turn in kept)
    assert not any(turn in text for turn in context[: len(context) - encoded.kept_turns])
    # The kept turns render exactly as they did in the untruncated chat (same roles).
    untruncated = tokenizer.decode(full.input_ids)
    assert untruncated.endswith(text[text.index(kept[0]) :])
    assert encoded.input_ids[encoded.loss_mask == 1].tolist() == (
        full.input_ids[full.loss_mask == 1].tolist()
    )
    # At every limit the most recent turns that fit are kept, all of them when they fit.
    lengths = [
        len(encode_chat(tokenizer, context[len(context) - k :], SYSTEM, 4096, response).input_ids)
        for k in range(len(context) + 1)
    ]  # [turns kept + 1], rising
    for limit in range(lengths[1], lengths[-1] + 2):
        kept = encode_chat(tokenizer, context, SYSTEM, limit, response).kept_turns
        assert kept == max(k for k in range(1, len(context) + 1) if lengths[k] <= limit), limit


def test_overlong_last_turn_keeps_its_end_and_the_whole_response(tokenizer):
    last = " ".join(f"w{i}" for i in range(300)) + " the very end"
    response = "I hear you."
    encoded = encode_chat(tokenizer, ["older turn", last], SYSTEM, 200, response)
    assert len(encoded.input_ids) <= 200
    assert encoded.shortened == "last_turn" and encoded.kept_turns == 1
    prompt = tokenizer.decode(encoded.input_ids[: encoded.prompt_length])
    assert "the very end<|eot_id|>" in prompt and "older turn" not in prompt
    assert tokenizer.decode(encoded.input_ids[encoded.loss_mask == 1]) == response + "<|eot_id|>"


def test_overlong_response_keeps_its_beginning(tokenizer):
    response = "start " + " ".join(f"r{i}" for i in range(300))
    encoded = encode_chat(tokenizer, ["hi"], SYSTEM, 100, response)
    assert len(encoded.input_ids) == 100 and encoded.shortened == "response"
    assert encoded.loss_mask.sum() == 100 - encoded.prompt_length > 0
    reply = tokenizer.decode(encoded.input_ids[encoded.loss_mask == 1])
    assert response.startswith(reply) and END_OF_TURN_TOKEN not in reply


def test_limit_below_system_prompt_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no room"):
        encode_chat(tokenizer, ["hi"], "a long system prompt " * 20, 30, "reply")


def test_template_tail_after_end_of_turn_is_dropped():
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(
        [AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")], special_tokens=True
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoded = encode_chat(tokenizer, ["hi"], SYSTEM, 256, "hello")
    assert tokenizer.decode(encoded.input_ids[encoded.loss_mask == 1]) == "hello<|im_end|>"
    assert encoded.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
