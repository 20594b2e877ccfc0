"""ESConv: `ESConv.json`, a list of dialogues between a help seeker and a supporter.

The hub copy (and its split files) stores each dialogue as a JSON string: a JSON/JSONL file
whose rows are {"text": "<one dialogue as JSON>"}, or a JSON list of such strings. Both forms
are read here. Consecutive turns by one speaker are common and are merged before pairing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lisendiff_jax.data.errors import BadRecord, Problems, one_line
from lisendiff_jax.data.readers._common import (
    Dialogue,
    Turn,
    canonical_split,
    clean,
    load_json,
    merge_consecutive,
    parse_json,
    read_lines,
    require,
    resolve_file,
)

NAME = "esconv"
STYLE = "empathy"
LANG = "en"
SPEAKERS = ("seeker", "supporter")
LISTENER = "supporter"


def candidates(split: str | None) -> list[str]:
    if split is None:
        return ["ESConv.json", "train.json", "train.jsonl"]
    name = {"valid": "validation"}.get(canonical_split(split) or "", split)
    return [f"{name}.json", f"{name}.jsonl"]


def read(path: Path, split: str | None, problems: Problems) -> Iterator[Dialogue]:
    file = resolve_file(path, candidates(split), "ESConv json file")
    if _is_json_lines(file):
        for number, line in read_lines(file):
            if not line.strip():
                continue
            try:
                dialogue = _dialogue(f"{file.name}:{number}", parse_json(line))
            except BadRecord as error:
                problems.report(f"{file}:{number}", str(error))
                continue
            yield dialogue
        return
    items = load_json(file)
    if not isinstance(items, list):
        items = [items]
    for i, item in enumerate(items):
        try:
            dialogue = _dialogue(f"{file.name}#{i}", item)
        except BadRecord as error:
            problems.report(f"{file}: dialogue {i}", str(error))
            continue
        yield dialogue


def read_hub(
    rows: Iterable[Mapping[str, Any]], where: str, problems: Problems
) -> Iterator[Dialogue]:
    for i, row in enumerate(rows):
        try:
            dialogue = _dialogue(f"{where}:{i}", dict(row))
        except BadRecord as error:
            problems.report(f"{where} row {i}", str(error))
            continue
        yield dialogue


def _is_json_lines(file: Path) -> bool:
    """A JSONL file has one complete value per line; a JSON document starts with `[` or `{`
    and spans lines. Looking at the first non-blank line is enough to tell them apart."""
    if file.suffix == ".jsonl":
        return True
    for _, line in read_lines(file):
        if line.strip():
            stripped = line.strip()
            return stripped.startswith("{") and stripped.endswith("}") and len(stripped) > 2
    return False


def _dialogue(dialogue_id: str, item: Any) -> Dialogue:
    # Unwrap the hub's forms: {"text": "<json>"} or a bare JSON string.
    if isinstance(item, Mapping) and "dialog" not in item and "text" in item:
        item = require(item, "text")
    if isinstance(item, str):
        item = parse_json(item)
    turns = []
    for k, turn in enumerate(require(item, "dialog", list)):
        try:
            speaker = require(turn, "speaker")
            text = require(turn, "content")
        except BadRecord as error:
            raise BadRecord(f"turn {k}: {error}") from None
        if speaker not in SPEAKERS:
            raise BadRecord(
                f"turn {k}: speaker should be one of {SPEAKERS}, got {one_line(speaker)}"
            )
        turns.append(Turn(speaker, clean(text)))
    return Dialogue(dialogue_id, merge_consecutive(turns), LISTENER, STYLE, LANG)
