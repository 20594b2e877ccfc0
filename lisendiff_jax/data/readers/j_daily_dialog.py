"""Japanese Daily Dialogue (J-DailyDialog): `topic*.json`, one file per topic.

Each file is a JSON list of {topic_id, topic_name, dialogue_id, utterances: [{turn_num,
speaker, utterance}]}. A directory is searched for every `topic*.json` below it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lisendiff_jax.data.errors import BadRecord, Problems
from lisendiff_jax.data.readers._common import (
    Dialogue,
    Turn,
    as_int,
    clean,
    load_json,
    require,
    resolve_glob,
)

NAME = "j_daily_dialog"
STYLE = "default"
LANG = "ja"


def read(path: Path, split: str | None, problems: Problems) -> Iterator[Dialogue]:
    # The corpus has no splits; `split` is accepted so that every format is called alike.
    for file in resolve_glob(path, "topic*.json", "J-DailyDialog topic*.json file"):
        items = load_json(file)
        if isinstance(items, Mapping):
            items = [items]  # a file holding a single dialogue object
        if not isinstance(items, list):
            problems.report(str(file), "expected a JSON list of dialogues")
            continue
        for i, item in enumerate(items):
            try:
                dialogue = _dialogue(file, item)
            except BadRecord as error:
                problems.report(f"{file}: dialogue {i}", str(error))
                continue
            yield dialogue


def _dialogue(file: Path, item: Any) -> Dialogue:
    dialogue_id = require(item, "dialogue_id", (int, str))
    numbered = []
    for k, utterance in enumerate(require(item, "utterances", list)):
        try:
            number = as_int(require(utterance, "turn_num", (int, str)), "turn_num")
            speaker = str(require(utterance, "speaker", (str, int)))
            text = require(utterance, "utterance")
        except BadRecord as error:
            raise BadRecord(f"dialogue_id {dialogue_id}, utterance {k}: {error}") from None
        numbered.append((number, Turn(speaker, clean(text))))
    numbered.sort(key=lambda pair: pair[0])  # stable: equal turn numbers keep file order
    turns = tuple(turn for _, turn in numbered)
    return Dialogue(f"{file.stem}:{dialogue_id}", turns, None, STYLE, LANG)
