"""EmpatheticDialogues: `train.csv`/`valid.csv`/`test.csv`, one utterance per row.

The files are not quoted CSV: commas inside text are written `_comma_`, so a row is split on
plain commas. Some rows carry extra fields (retrieval candidates) after the 8 header columns;
they are not dialogue turns and are ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lisendiff_jax.data.errors import BadRecord, DataError, Problems
from lisendiff_jax.data.readers._common import (
    Dialogue,
    Turn,
    as_int,
    canonical_split,
    clean,
    read_lines,
    resolve_file,
    second_speaker,
)

NAME = "empathetic_dialogues"
STYLE = "empathy"
LANG = "en"
HEADER = (
    "conv_id",
    "utterance_idx",
    "context",
    "prompt",
    "speaker_idx",
    "utterance",
    "selfeval",
    "tags",
)


def unescape(text: str) -> str:
    return text.replace("_comma_", ",")


def read(path: Path, split: str | None, problems: Problems) -> Iterator[Dialogue]:
    file = resolve_file(
        path, [f"{canonical_split(split) or 'train'}.csv"], "EmpatheticDialogues csv"
    )
    lines = read_lines(file)
    first = next(lines, None)
    if first is None or tuple(first[1].split(",")[: len(HEADER)]) != HEADER:
        raise DataError(f"{file}:1: expected the header {','.join(HEADER)}")
    rows = ((f"{file}:{number}", line.split(",")) for number, line in lines if line.strip())
    return _dialogues(rows, problems)


def read_hub(
    rows: Iterable[Mapping[str, Any]], where: str, problems: Problems
) -> Iterator[Dialogue]:
    """The hub copy has the same columns, already split."""
    fields = (
        (f"{where} row {i}", [str(row.get(column, "")) for column in HEADER])
        for i, row in enumerate(rows)
    )
    return _dialogues(fields, problems)


def _dialogues(rows: Iterable[tuple[str, list[str]]], problems: Problems) -> Iterator[Dialogue]:
    # conv_id -> {utterance_idx: (speaker_idx, text)}; dicts keep first-appearance order.
    conversations: dict[str, dict[int, tuple[str, str]]] = {}
    damaged: set[str] = set()
    for where, fields in rows:
        conv_id = fields[0].strip()
        try:
            index, speaker, text = _parse_row(fields)
            if index in conversations.get(conv_id, {}):
                raise BadRecord(f"utterance_idx {index} appears twice in {conv_id!r}")
        except BadRecord as error:
            # A conversation with a hole would pair replies with the wrong context.
            skipping = f"skipped conversation {conv_id!r}" if conv_id else ""
            problems.report(where, str(error), skipping)
            damaged.add(conv_id)
            continue
        conversations.setdefault(conv_id, {})[index] = (speaker, text)
    for conv_id, utterances in conversations.items():
        if conv_id in damaged:
            continue
        turns = tuple(Turn(speaker, text) for _, (speaker, text) in sorted(utterances.items()))
        yield Dialogue(conv_id, turns, second_speaker(turns), STYLE, LANG)


def _parse_row(fields: list[str]) -> tuple[int, str, str]:
    if len(fields) < len(HEADER):
        raise BadRecord(f"expected {len(HEADER)} comma-separated fields, found {len(fields)}")
    if not fields[0].strip():
        raise BadRecord("empty conv_id")
    speaker = fields[4].strip()
    if not speaker:
        raise BadRecord("empty speaker_idx")
    return as_int(fields[1], "utterance_idx"), speaker, clean(unescape(fields[5]))
