"""Languages: tags, their names, and the system prompts a user writes for them.

A language is a BCP 47 tag as the data and the options spell it ("ko", "de", "pt-BR"); tags
are compared as written, never normalised, so a prompt's key must match the `lang` of the
examples and requests it is for. Names come from `langcodes` (English names: "Korean").

A prompts file (`data.prompts`) is a JSON object mapping language tags to system prompts, for
the languages without a built-in one (formatting.SYSTEM_PROMPTS) or to replace one, e.g.
    {"ko": "당신은 따뜻하게 이야기를 들어 주는 친구입니다. 한국어로 답하세요. ..."}
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import langcodes

from lisendiff_jax.errors import UserError


class PromptsFileError(UserError, ValueError):
    """A prompts file that cannot be read or holds something else than tag -> prompt."""


def is_language_tag(tag: object) -> bool:
    return isinstance(tag, str) and langcodes.tag_is_valid(tag)


def language_name(tag: str) -> str:
    """The English name of language `tag` ("ko" -> "Korean"); the tag itself if it is none."""
    if not is_language_tag(tag):
        return tag
    return langcodes.Language.get(tag).display_name()


def describe(tag: str) -> str:
    """A tag for messages: "'ko' (Korean)", or "'xx' (not a language tag)"."""
    if not is_language_tag(tag):
        return f"{tag!r} (not a language tag)"
    return f"{tag!r} ({language_name(tag)})"


def read_prompts(path: str | os.PathLike) -> dict[str, str]:
    """The prompts of a prompts file; PromptsFileError naming the file (and key) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PromptsFileError(f"{path}: no such prompts file")
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PromptsFileError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(prompts, dict) or not prompts:
        raise PromptsFileError(
            f'{path}: expected a JSON object of language tag -> system prompt, e.g. {{"ko": "..."}}'
        )
    for tag, prompt in prompts.items():
        if not is_language_tag(tag):
            raise PromptsFileError(f"{path}: key {tag!r} is not a language tag (e.g. 'ko')")
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptsFileError(f"{path}: key {tag!r}: the prompt must be a non-empty string")
    return prompts


def missing_prompt(tag: str, prompts: Mapping[str, str]) -> str:
    """The message for a language without a prompt among `prompts`."""
    return (
        f"no system prompt for language {describe(tag)} (have {', '.join(sorted(prompts))}); "
        "give one in a JSON file of language -> prompt with --config.data.prompts=FILE"
    )
