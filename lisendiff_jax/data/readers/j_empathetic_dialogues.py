"""J-EmpatheticDialogues: an Excel workbook with a situation sheet and a dialogue sheet.

The situation sheet has columns (ID, emotion, situation), the dialogue sheet (ID, speaker,
utterance), one row per utterance, IDs like `1_1`. Sheets are found by their header row, not
their names, and headers may be English or Japanese. The dialogue rows of one ID form one
dialogue; where the dialogue sheet numbers each utterance instead (`1_1_3` for situation
`1_1`), the part before the last `_` is the dialogue.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lisendiff_jax.data.errors import BadRecord, DataError, Problems, one_line
from lisendiff_jax.data.readers._common import Dialogue, Turn, clean, resolve_glob, second_speaker

NAME = "j_empathetic_dialogues"
STYLE = "empathy"
LANG = "ja"

# Header spellings seen or plausible in the released workbook, compared case-insensitively.
COLUMNS = {
    "id": ("id",),
    "emotion": ("emotion", "感情"),
    "situation": ("situation", "状況", "状況文"),
    "speaker": ("speaker", "話者"),
    "utterance": ("utterance", "発話"),
}
# Speaker labels that mark the listener outright; otherwise the second speaker listens.
LISTENER_LABELS = ("listener", "聞き手")


def read(path: Path, split: str | None, problems: Problems) -> Iterator[Dialogue]:
    import openpyxl  # only this reader needs it

    for file in resolve_glob(path, "*.xlsx", "J-EmpatheticDialogues .xlsx workbook"):
        try:
            workbook = openpyxl.load_workbook(file, read_only=True, data_only=True)
        except Exception as error:  # openpyxl raises many kinds; all mean "not a workbook"
            reason = " ".join(str(error).split())
            raise DataError(f"{file}: cannot open it as an Excel workbook: {reason}") from None
        try:
            yield from _read_workbook(file, workbook, problems)
        finally:
            workbook.close()


def _read_workbook(file: Path, workbook: Any, problems: Problems) -> Iterator[Dialogue]:
    situations = _find_sheet(file, workbook, ("id", "emotion", "situation"))
    dialogues = _find_sheet(file, workbook, ("id", "speaker", "utterance"))
    situation_ids = {_cell_text(row[situations.columns["id"]]) for _, row in _data_rows(situations)}
    grouped: dict[str, list[Turn]] = {}
    for number, row in _data_rows(dialogues):
        where = f"{file}: sheet {dialogues.title!r} row {number}"
        speaker = _cell_text(row[dialogues.columns["speaker"]])
        text = clean(_cell_text(row[dialogues.columns["utterance"]]))
        try:
            key = _dialogue_key(_cell_text(row[dialogues.columns["id"]]), situation_ids)
            if text and not speaker:
                raise BadRecord("empty speaker")
        except BadRecord as error:
            problems.report(where, str(error))
            continue
        grouped.setdefault(key, []).append(Turn(speaker, text))
    for key, turns in grouped.items():
        yield Dialogue(key, tuple(turns), _listener(turns), STYLE, LANG)


class _Sheet:
    def __init__(self, worksheet: Any, columns: dict[str, int]) -> None:
        self.worksheet = worksheet
        self.title = worksheet.title
        self.columns = columns


def _find_sheet(file: Path, workbook: Any, wanted: Sequence[str]) -> _Sheet:
    for worksheet in workbook.worksheets:
        header = next(worksheet.iter_rows(max_row=1, values_only=True), ())
        names = [_cell_text(value).casefold() for value in header]
        columns = {}
        for column in wanted:
            found = [i for i, name in enumerate(names) if name in COLUMNS[column]]
            if found:
                columns[column] = found[0]
        if len(columns) == len(wanted):
            return _Sheet(worksheet, columns)
    titles = ", ".join(repr(ws.title) for ws in workbook.worksheets)
    raise DataError(f"{file}: no sheet with the columns {', '.join(wanted)} (sheets: {titles})")


def _data_rows(sheet: _Sheet) -> Iterator[tuple[int, tuple[Any, ...]]]:
    """(1-based Excel row number, cells) after the header, without fully empty rows."""
    width = max(sheet.columns.values()) + 1
    for number, row in enumerate(sheet.worksheet.iter_rows(min_row=2, values_only=True), 2):
        cells = tuple(row) + (None,) * (width - len(row))
        if any(_cell_text(cell) for cell in cells):
            yield number, cells


def _cell_text(value: Any) -> str:
    # Excel turns numeric IDs into floats; 3.0 must read back as "3".
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return "" if value is None else str(value).strip()


def _dialogue_key(row_id: str, situation_ids: set[str]) -> str:
    if not row_id:
        raise BadRecord("empty ID")
    if row_id in situation_ids:
        return row_id
    prefix = row_id.rpartition("_")[0]
    if prefix in situation_ids:
        return prefix
    raise BadRecord(f"ID {one_line(row_id)} has no row in the situation sheet")


def _listener(turns: Sequence[Turn]) -> str | None:
    labelled = [t.speaker for t in turns if t.speaker.casefold() in LISTENER_LABELS]
    return labelled[0] if labelled else second_speaker(turns)
