"""One reader per corpus, behind one entry point: `load_pairs(format, path)`.

Each reader turns its native files into `Dialogue`s; cutting them into (context, response)
examples happens once, in `_common.to_examples`, so the pairing rules cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lisendiff_jax.data.errors import DataError, Problems, SkippedRowsWarning
from lisendiff_jax.data.example import Example
from lisendiff_jax.data.readers import (
    daily_dialog,
    empathetic_dialogues,
    esconv,
    j_daily_dialog,
    j_empathetic_dialogues,
    jsonl,
)
from lisendiff_jax.data.readers._common import (
    Dialogue,
    check_hub_on,
    load_hub_rows,
    looks_like_hub_id,
    to_examples,
)

LocalReader = Callable[[Path, "str | None", Problems], Iterator[Dialogue]]
HubReader = Callable[[Iterable[Mapping[str, Any]], str, Problems], Iterator[Dialogue]]


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    read: LocalReader
    # Only corpora whose hub copy keeps enough structure to rebuild the dialogues.
    read_hub: HubReader | None = None


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(empathetic_dialogues.NAME, empathetic_dialogues.read, empathetic_dialogues.read_hub),
        Format(daily_dialog.NAME, daily_dialog.read, daily_dialog.read_hub),
        Format(esconv.NAME, esconv.read, esconv.read_hub),
        Format(j_daily_dialog.NAME, j_daily_dialog.read),
        Format(j_empathetic_dialogues.NAME, j_empathetic_dialogues.read),
        Format(jsonl.NAME, jsonl.read),
    )
}


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Everything read from one source: examples grouped by dialogue, and what was skipped.

    `dialogues` keeps dialogues that give no pair (e.g. a single turn) as empty tuples, so
    `len(dialogues)` is the number of dialogues in the files.
    """

    format: str
    path: str
    split: str | None
    dialogues: tuple[tuple[Example, ...], ...]
    skipped: int = 0
    problems: tuple[str, ...] = ()

    @property
    def examples(self) -> list[Example]:
        return [example for dialogue in self.dialogues for example in dialogue]


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise DataError(f"unknown corpus format {name!r}; valid formats: {', '.join(FORMATS)}")
    return FORMATS[name]


def check_path(format: str, path: str | os.PathLike[str]) -> None:
    """Raises DataError unless `load_corpus` can find `path`: on disk, or for corpora the hub
    carries, a hub dataset id while the hub is on."""
    spec = get_format(format)
    if Path(path).exists():
        return
    if spec.read_hub is None or not looks_like_hub_id(str(path)):
        raise DataError(f"{path}: no such file or directory (format {format!r})")
    check_hub_on(str(path))


def load_corpus(
    format: str,
    path: str | os.PathLike[str],
    split: str | None = None,
    on_error: str = "raise",
) -> Corpus:
    """Reads one corpus from a file, the directory holding its files, or (for corpora the
    hub carries, when the hub is reachable) a hub dataset id.

    `on_error="skip"` leaves out malformed rows instead of raising; their number and one
    message per row come back in the result and in a `SkippedRowsWarning`. Problems with a
    whole file (missing, not JSON, not a workbook, wrong header) always raise `DataError`.
    """
    spec = get_format(format)
    problems = Problems(on_error)
    check_path(format, path)
    local = Path(path)
    if local.exists():
        dialogues = spec.read(local, split, problems)
    else:
        where = f"{path}[{split or 'train'}]"
        dialogues = spec.read_hub(load_hub_rows(str(path), split), where, problems)
    grouped = tuple(tuple(to_examples(d, format)) for d in dialogues)
    if problems.skipped:
        message = (
            f"{format} {path}: skipped {problems.skipped} malformed row(s); "
            f"first: {problems.messages[0]}"
        )
        # The warning is the one report: logging the message as well printed it twice.
        warnings.warn(message, SkippedRowsWarning, stacklevel=2)
    return Corpus(
        format=format,
        path=str(path),
        split=split,
        dialogues=grouped,
        skipped=problems.skipped,
        problems=tuple(problems.messages),
    )


def load_pairs(
    format: str,
    path: str | os.PathLike[str],
    split: str | None = None,
    on_error: str = "raise",
) -> list[Example]:
    """The (context, response) examples of one corpus; see `load_corpus` for the arguments.

    Use `load_corpus` when the number of skipped rows is needed as a value.
    """
    return load_corpus(format, path, split=split, on_error=on_error).examples


__all__ = ["FORMATS", "Corpus", "Format", "check_path", "get_format", "load_corpus", "load_pairs"]
