"""The sample data shipped inside the package, and the evaluation situations.

Everything under `samples/` was written for this project in each corpus's native format,
so the demo and the tests run with no download. Configs point at it with `sample_path`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lisendiff_jax.data.errors import BadRecord, DataError
from lisendiff_jax.data.languages import is_language_tag
from lisendiff_jax.data.readers._common import parse_json, read_lines, require, resolve_glob

SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
POLARITIES = ("positive", "negative")


def sample_path(name: str = "") -> Path:
    """The bundled folder (or file) `name` under samples/, e.g. "esconv" or
    "situations/zh_cantonese.jsonl"; the samples root when `name` is empty."""
    path = SAMPLES_DIR / name
    if not path.exists():
        available = ", ".join(sorted(p.name for p in SAMPLES_DIR.iterdir() if p.is_dir()))
        raise DataError(f"{path}: no bundled sample {name!r} (available: {available})")
    return path


@dataclasses.dataclass(frozen=True)
class Situation:
    """An emotional situation a simulated speaker role-plays in evaluation."""

    id: str
    lang: str
    polarity: str
    emotion: str
    situation: str


def load_situations(path: str | os.PathLike[str]) -> list[Situation]:
    """Situations from a JSONL file, or from every .jsonl file in a directory.

    Fields: id, lang (a language tag: "zh", "yue", "ko", ...), polarity ("positive" or
    "negative"), emotion, situation; the bundled files are Mandarin and Cantonese, a user's
    may be in any language.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    situations = []
    for file in resolve_glob(path, "*.jsonl", "situations .jsonl file"):
        for number, line in read_lines(file):
            if not line.strip():
                continue
            try:
                situations.append(_situation(parse_json(line)))
            except BadRecord as error:
                raise DataError(f"{file}:{number}: {error}") from None
    return situations


def _situation(record: object) -> Situation:
    fields = {name: require(record, name).strip() for name in Situation.__dataclass_fields__}
    for name, value in fields.items():
        if not value:
            raise BadRecord(f"empty field {name!r}")
    if not is_language_tag(fields["lang"]):
        raise BadRecord(f"lang {fields['lang']!r} is not a language tag (e.g. 'zh', 'ko')")
    if fields["polarity"] not in POLARITIES:
        raise BadRecord(f"polarity should be one of {POLARITIES}, got {fields['polarity']!r}")
    return Situation(**fields)
