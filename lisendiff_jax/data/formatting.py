"""Turning examples into token ids with the backbone's own chat template.

Roles. The response is always the assistant's turn, so roles are assigned backwards from it: the
newest context turn is "user", the one before it "assistant", and so on. With an odd number of
context turns the conversation (after the system prompt) opens with a user turn; with an even
number it opens with an assistant turn. Dropping the oldest turns never changes the role of the
turns that stay. Llama-3 and Qwen2 templates accept either opening.

Loss. An encoded example carries `prompt_length`: tokens before it (system prompt, context,
the assistant header) get loss mask 0; the response tokens, including the template's
end-of-turn token, get 1. Anything a template writes after that end-of-turn token (ChatML adds a
newline) is dropped: the model never needs to predict it. The mask is aligned with the input
ids, so the loss for token t uses the logits at t - 1 and `loss_mask[t]`.

Length. When the chat exceeds `max_length` tokens, whole turns are dropped from the oldest end.
If the newest context turn with the response still does not fit, that turn keeps only its end
(its last characters, as many as fit). If the response alone with an empty newest turn does not
fit, the response keeps its beginning and loses its end, end-of-turn token included. A system
prompt that leaves no room for a single response token is an error.

Control tokens written inside messages (a literal "<|eot_id|>" in a corpus line) are encoded as
plain text, never as the control token, so data cannot forge turn boundaries.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from lisendiff_jax.data.example import Example
from lisendiff_jax.data.languages import describe

# One prompt per language the listener speaks, keyed by language code: zh = Mandarin, yue =
# Cantonese. Each asks for a short, empathetic reply in that language. Other languages take
# theirs from a prompts file (config `data.prompts`, languages.py).
SYSTEM_PROMPTS: Mapping[str, str] = {
    "en": (
        "You are a warm and attentive listener. Reply in English. Notice how the other person "
        "feels and answer with empathy, in everyday words. Keep each reply short: one or two "
        "sentences."
    ),
    "ja": (
        "あなたは温かく話を聴く相手です。日本語で返事をしてください。"
        "相手の気持ちに気づき、共感を込めて、ふだんの話し言葉で応えてください。"
        "返事は一、二文の短さにしてください。"
    ),
    "zh": (
        "你是一位温暖、用心倾听的朋友。请用普通话回复。"
        "留意对方的感受，带着同理心，用日常口语回应。每次回复简短，一两句话即可。"
    ),
    "yue": (
        "你係一個溫暖、用心聆聽嘅朋友。請用廣東話回覆。"
        "留意對方嘅感受，用同理心同日常口語回應。每次回覆簡短啲，一兩句就夠。"
    ),
}

Shortened = Literal["none", "last_turn", "response"]


class NoRoomError(ValueError):
    """`max_length` leaves no room for a reply after the system prompt."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One chat as token ids.

    `kept_turns` counts the newest context turns present after truncation; `shortened` says
    whether a turn or the response was cut inside (beyond dropping whole old turns).
    """

    input_ids: np.ndarray  # [seq] int32
    prompt_length: int
    kept_turns: int
    shortened: Shortened = "none"

    @property
    def loss_mask(self) -> np.ndarray:
        """[seq] int32: 1 on response tokens (end-of-turn included), 0 on the prompt."""
        return (np.arange(len(self.input_ids)) >= self.prompt_length).astype(np.int32)


def system_prompt(lang: str, prompts: Mapping[str, str] = SYSTEM_PROMPTS) -> str:
    """The system prompt for language `lang` among `prompts` (a run's: config.system_prompts;
    by default the built-in ones); ValueError naming the language if it has none."""
    try:
        return prompts[lang]
    except (KeyError, TypeError):  # TypeError: a lang that is no string (a JSON list)
        raise ValueError(
            f"no system prompt for language {describe(lang)} (have {', '.join(sorted(prompts))})"
        ) from None


def chat_messages(
    context: Sequence[str], system: str | None, response: str | None = None
) -> list[dict[str, str]]:
    """System prompt, context turns with roles counted back from the reply, optional reply.

    `system=None` leaves the system message out, so the chat template's own default (if it has
    one) applies.
    """
    n = len(context)
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages += [
        {"role": "user" if (n - 1 - i) % 2 == 0 else "assistant", "content": text}
        for i, text in enumerate(context)
    ]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def _apply_template(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool
) -> np.ndarray:
    ids = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=generation_prompt,
        tokenize=True,
        return_dict=False,
        sanitize_control_tokens=True,
    )
    return np.asarray(ids, dtype=np.int32)


def _control_token_ids(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    return np.array(
        [i for i, token in tokenizer.added_tokens_decoder.items() if token.special], np.int32
    )


def _render(
    tokenizer: PreTrainedTokenizerBase,
    context: Sequence[str],
    system: str | None,
    response: str | None,
) -> tuple[np.ndarray, int]:
    """Token ids of the whole chat [seq] and the length of its prompt part."""
    messages = chat_messages(context, system)
    prompt = _apply_template(tokenizer, messages, generation_prompt=True)
    if response is None:
        return prompt, len(prompt)
    full = _apply_template(
        tokenizer, messages + [{"role": "assistant", "content": response}], False
    )
    if not np.array_equal(full[: len(prompt)], prompt):
        raise ValueError(
            "the chat template does not render the prompt as a prefix of the full chat, so the "
            "response tokens cannot be located"
        )
    reply = full[len(prompt) :]
    control = np.flatnonzero(np.isin(reply, _control_token_ids(tokenizer)))
    if control.size:
        reply = reply[: control[-1] + 1]
    return np.concatenate([prompt, reply]), len(prompt)


def _largest_true(predicate: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """Largest k in [lo, hi] with predicate(k), for a predicate true up to some k; or None."""
    if hi < lo or not predicate(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if predicate(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    context: Sequence[str],
    system: str | None,
    max_length: int,
    response: str | None = None,
) -> Encoded:
    """Encode a chat for training (with `response`) or for generation (without); `system`
    None encodes it without a system message.

    Without a response the ids end with the assistant header, ready for decoding, and
    `prompt_length` equals their length. Truncation follows the module docstring.
    """

    @functools.cache  # the search's last try is the chat returned
    def render(turns: tuple[str, ...]) -> tuple[np.ndarray, int]:
        return _render(tokenizer, turns, system, response)

    def fits(turns: tuple[str, ...]) -> bool:
        return len(render(turns)[0]) <= max_length

    context = tuple(context)
    n = len(context)
    # Most chats fit whole: one render, not a search's log2(n) + 2. (The number of tokens
    # grows with every turn kept, so the search finds the same turns when they do not fit.)
    kept = n if fits(context) else _largest_true(lambda k: fits(context[n - k :]), min(n, 1), n - 1)
    if kept is not None:
        ids, prompt_length = render(context[n - kept :])
        return Encoded(ids, prompt_length, kept)
    if context:
        last = context[-1]
        chars = _largest_true(lambda c: fits((last[len(last) - c :],)), 0, len(last))
        if chars is not None:
            ids, prompt_length = render((last[len(last) - chars :],))
            return Encoded(ids, prompt_length, 1, "last_turn")
    ids, prompt_length = render(("",) if context else ())
    if response is None or prompt_length >= max_length:
        raise NoRoomError(
            f"max_length={max_length} leaves no room for the reply after the system prompt "
            f"({prompt_length} prompt tokens with an empty context)"
        )
    return Encoded(ids[:max_length], prompt_length, min(n, 1), "response")


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    system: str | Mapping[str, str] | None,
    max_length: int,
    progress: bool = True,
) -> list[Encoded]:
    """Encode examples for training.

    `system` is one prompt for every example, a mapping from `Example.lang` to a prompt
    (e.g. SYSTEM_PROMPTS), or None for no system message.
    """

    def prompt_for(example: Example) -> str | None:
        if system is None or isinstance(system, str):
            return system
        return system_prompt(example.lang, system)

    return [
        encode_chat(tokenizer, ex.context, prompt_for(ex), max_length, ex.response)
        for ex in tqdm(examples, desc="tokenizing", disable=not progress)
    ]
