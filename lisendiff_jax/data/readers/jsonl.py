"""Our own format, for dialogues in any language: one JSON dialogue per line.

{"id": ..., "lang": "zh", "style": "empathy", "listener": "B" (optional),
 "turns": [{"speaker": "A", "text": ...}, ...]}
With a listener, that speaker's turns are the responses; without one, every turn after the
first is (as for the daily corpora).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lisendiff_jax.data.errors import BadRecord, Problems
from lisendiff_jax.data.readers._common import (
    Dialogue,
    Turn,
    check_style,
    clean,
    parse_json,
    read_lines,
    require,
    resolve_glob,
)

NAME = "jsonl"


def read(path: Path, split: str | None, problems: Problems) -> Iterator[Dialogue]:
    pattern = f"{split}*.jsonl" if split else "*.jsonl"
    for file in resolve_glob(path, pattern, "JSONL dialogue file"):
        for number, line in read_lines(file):
            if not line.strip():
                continue
            try:
                dialogue = parse_dialogue(parse_json(line), default_id=f"{file.name}:{number}")
            except BadRecord as error:
                problems.report(f"{file}:{number}", str(error))
                continue
            yield dialogue


def parse_dialogue(record: Any, default_id: str) -> Dialogue:
    lang = require(record, "lang")
    if not lang.strip():
        raise BadRecord("empty lang")
    style = check_style(require(record, "style"))
    listener = record.get("listener")
    if listener is not None and not isinstance(listener, str):
        raise BadRecord(f"field 'listener' should be str, got {type(listener).__name__}")
    turns = []
    for k, turn in enumerate(require(record, "turns", list)):
        try:
            text = require(turn, "text")
            speaker = require(turn, "speaker") if listener is not None else turn.get("speaker", "")
        except BadRecord as error:
            raise BadRecord(f"turn {k}: {error}") from None
        turns.append(Turn(str(speaker), clean(text)))
    if listener is not None and not any(t.speaker == listener for t in turns):
        raise BadRecord(f"listener {listener!r} never speaks")
    dialogue_id = str(record.get("id", default_id))
    return Dialogue(dialogue_id, tuple(turns), listener, style, lang.strip())
