"""DailyDialog: one dialogue per line, turns separated by `__eou__`.

The full corpus is `dialogues_text.txt`; the split archives hold `dialogues_{split}.txt`
(`train`, `validation`, `test`). The emotion and act files align with it turn by turn but
carry nothing a (context, response) pair needs, so they are not read.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lisendiff_jax.data.errors import BadRecord, Problems
from lisendiff_jax.data.readers._common import (
    Dialogue,
    Turn,
    canonical_split,
    clean,
    read_lines,
    resolve_file,
)

NAME = "daily_dialog"
STYLE = "default"
LANG = "en"
SEPARATOR = "__eou__"


def candidates(split: str | None) -> list[str]:
    if split is None:
        return ["dialogues_text.txt", "dialogues_train.txt", "train/dialogues_train.txt"]
    name = {"valid": "validation"}.get(canonical_split(split) or "", split)
    return [f"dialogues_{name}.txt", f"{name}/dialogues_{name}.txt"]


def read(path: Path, split: str | None, problems: Problems) -> Iterator[Dialogue]:
    file = resolve_file(path, candidates(split), "DailyDialog text file")
    for number, line in read_lines(file):
        if not line.strip():
            continue  # a blank line holds no dialogue (files end with one)
        try:
            texts = split_turns(line)
        except BadRecord as error:
            problems.report(f"{file}:{number}", str(error))
            continue
        yield _dialogue(f"{file.name}:{number}", texts)


def read_hub(
    rows: Iterable[Mapping[str, Any]], where: str, problems: Problems
) -> Iterator[Dialogue]:
    """The hub copy stores each dialogue as a list of turns under "dialog"."""
    for i, row in enumerate(rows):
        texts = row.get("dialog")
        if not isinstance(texts, list):
            problems.report(f"{where} row {i}", "missing list field 'dialog'")
            continue
        yield _dialogue(f"{where}:{i}", [clean(t) for t in texts])


def split_turns(line: str) -> list[str]:
    if SEPARATOR not in line:
        raise BadRecord(f"no {SEPARATOR} turn separator in the line")
    pieces = [clean(piece) for piece in line.split(SEPARATOR)]
    if pieces[-1]:
        raise BadRecord(f"the line does not end with {SEPARATOR} (truncated?)")
    return pieces[:-1]


def _dialogue(dialogue_id: str, texts: list[str]) -> Dialogue:
    return Dialogue(
        dialogue_id, tuple(Turn("AB"[i % 2], t) for i, t in enumerate(texts)), None, STYLE, LANG
    )
