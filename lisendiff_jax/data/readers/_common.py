"""What every corpus reader shares: dialogues as turns, pair extraction, file lookup, JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lisendiff_jax.data.errors import BadRecord, DataError, one_line
from lisendiff_jax.data.example import STYLES, Example


@dataclasses.dataclass(frozen=True)
class Turn:
    speaker: str
    text: str


@dataclasses.dataclass(frozen=True)
class Dialogue:
    """A dialogue as a reader found it, before it is cut into (context, response) pairs.

    `listener` names the speaker whose turns become responses; None means every turn after
    the first does (the rule for daily corpora, where both sides are equally "the model").
    """

    id: str
    turns: tuple[Turn, ...]
    listener: str | None
    style: str
    lang: str


def clean(text: object) -> str:
    """Turn text without surrounding whitespace; corpora carry stray spaces and newlines."""
    return "" if text is None else str(text).strip()


def merge_consecutive(turns: Iterable[Turn], joiner: str = " ") -> tuple[Turn, ...]:
    """Joins runs of turns by one speaker, so a reply always answers the other side.

    Empty turns are left out first, so that they cannot split a run in two.
    """
    merged: list[Turn] = []
    for turn in turns:
        if not turn.text:
            continue
        if merged and merged[-1].speaker == turn.speaker:
            merged[-1] = Turn(turn.speaker, merged[-1].text + joiner + turn.text)
        else:
            merged.append(turn)
    return tuple(merged)


def second_speaker(turns: Sequence[Turn]) -> str | None:
    """The first speaker who is not the opener: in ED-style corpora the opener tells the story
    and the other side listens."""
    if not turns:
        return None
    opener = turns[0].speaker
    return next((t.speaker for t in turns if t.speaker != opener), None)


def to_examples(dialogue: Dialogue, source: str) -> list[Example]:
    """Every listener reply with all earlier non-empty turns as its context.

    Empty turns are dropped before anything else: they are neither context nor responses.
    A listener turn with nothing before it has nothing to reply to and gives no pair.
    """
    turns = [t for t in dialogue.turns if t.text]
    examples = []
    for i, turn in enumerate(turns):
        if i == 0 or (dialogue.listener is not None and turn.speaker != dialogue.listener):
            continue
        examples.append(
            Example(
                context=[t.text for t in turns[:i]],
                response=turn.text,
                style=dialogue.style,
                lang=dialogue.lang,
                source=source,
                dialogue_id=dialogue.id,
            )
        )
    return examples


def check_style(style: object) -> str:
    if style not in STYLES:
        raise BadRecord(f"style must be one of {STYLES}, got {one_line(style)}")
    return str(style)


def require(record: object, key: str, kind: type | tuple[type, ...] = str) -> Any:
    """record[key], or a `BadRecord` saying what is missing or of the wrong type."""
    if not isinstance(record, Mapping):
        raise BadRecord(f"expected an object with {key!r}, got {type(record).__name__}")
    if key not in record:
        raise BadRecord(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise BadRecord(f"field {key!r} should be {names}, got {type(value).__name__}")
    return value


def as_int(value: object, name: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise BadRecord(f"{name} should be an integer, got {one_line(value)}") from None


# Split names differ between corpora ("valid" in ED, "validation" in DailyDialog).
_SPLIT_ALIASES = {"dev": "valid", "val": "valid", "validation": "valid"}


def canonical_split(split: str | None) -> str | None:
    return None if split is None else _SPLIT_ALIASES.get(split, split)


def resolve_file(path: Path, candidates: Sequence[str], what: str) -> Path:
    """`path` itself when it is a file, otherwise the first candidate that exists under it."""
    if path.is_file():
        return path
    for name in candidates:
        if (path / name).is_file():
            return path / name
    raise DataError(f"{path}: no {what} found (looked for {', '.join(candidates)})")


def resolve_glob(path: Path, pattern: str, what: str) -> list[Path]:
    """`path` when it is a file, else every file matching `pattern` below it, sorted."""
    if path.is_file():
        return [path]
    # Editors leave lock and hidden files ("~$book.xlsx", ".#x.json") next to the real ones.
    files = sorted(
        p for p in path.rglob(pattern) if p.is_file() and not p.name.startswith(("~$", "."))
    )
    if not files:
        raise DataError(f"{path}: no {what} found (looked for {pattern})")
    return files


def read_lines(file: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) for a UTF-8 text file."""
    try:
        with open(file, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                yield number, line.rstrip("\r\n")
    except UnicodeDecodeError as error:
        raise DataError(f"{file}: not UTF-8 text ({error.reason})") from None


def load_json(file: Path) -> Any:
    """A whole JSON document; a syntax error cannot be skipped, so it always raises."""
    text = "\n".join(line for _, line in read_lines(file))
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{file}:{error.lineno}: invalid JSON: {error.msg}") from None


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise BadRecord(f"invalid JSON: {error.msg} (column {error.colno})") from None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(path: str) -> bool:
    return bool(_HUB_ID.match(path)) and not Path(path).exists()


def hub_offline() -> bool:
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def check_hub_on(hub_id: str) -> None:
    """Raises DataError when the hub is switched off, for a path that is not on disk."""
    if hub_offline():
        raise DataError(
            f"{hub_id}: no such file or directory, and the hub is off "
            "(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)"
        )


def load_hub_rows(hub_id: str, split: str | None) -> Iterable[Mapping[str, Any]]:
    """Rows of a hub dataset; only reached for a path that is not on disk."""
    check_hub_on(hub_id)
    import datasets  # heavy, and only needed for hub ids

    try:
        return datasets.load_dataset(hub_id, split=split or "train")
    except Exception as error:  # any hub failure becomes one clear message
        reason = " ".join(str(error).split())
        raise DataError(f"{hub_id}: could not load it from the hub: {reason}") from None
