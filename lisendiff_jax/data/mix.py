"""The training mix: a seeded fraction of each corpus, shuffled together.

The paper takes 3% of DailyDialog, 10% of ESConv (or EmpatheticDialogues), 10% of
J-DailyDialog and 20% of J-EmpatheticDialogues. A fraction counts dialogues by default, so
that all replies of a chosen dialogue come along; `unit="pairs"` counts examples instead.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from lisendiff_jax.data.errors import DataError
from lisendiff_jax.data.example import STYLES, Example
from lisendiff_jax.data.readers import get_format, load_corpus

UNITS = ("dialogues", "pairs")

PAPER_FRACTIONS = {
    "daily_dialog": 0.03,
    "esconv": 0.10,
    "empathetic_dialogues": 0.10,
    "j_daily_dialog": 0.10,
    "j_empathetic_dialogues": 0.20,
}


@dataclasses.dataclass(frozen=True)
class MixSource:
    """One corpus in the mix. `name` labels it in counts and the summary (default: format)."""

    format: str
    path: str
    fraction: float
    split: str | None = None
    name: str | None = None
    on_error: str = "raise"

    @property
    def label(self) -> str:
        return self.name or self.format


@dataclasses.dataclass(frozen=True)
class StyleCount:
    dialogues: int
    pairs: int
    langs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SourceReport:
    """What one source contributed, for the summary printed before training."""

    name: str
    format: str
    path: str
    split: str | None
    fraction: float
    dialogues_available: int
    dialogues_selected: int
    pairs_available: int
    pairs_selected: int
    skipped: int
    by_style: dict[str, StyleCount]  # what was selected, per style


@dataclasses.dataclass(frozen=True)
class Mix:
    examples: list[Example]
    sources: tuple[SourceReport, ...]
    seed: int
    unit: str


def as_source(spec: MixSource | Sequence[Any] | Mapping[str, Any]) -> MixSource:
    """Accepts a MixSource, a (format, path, fraction[, split]) tuple or a config mapping."""
    if hasattr(spec, "to_dict"):
        spec = spec.to_dict()  # an ml_collections ConfigDict, which is not a Mapping
    if isinstance(spec, MixSource):
        source = spec
    elif isinstance(spec, Mapping):
        unknown = set(spec) - {f.name for f in dataclasses.fields(MixSource)}
        if unknown:
            raise DataError(f"mix source {dict(spec)!r}: unknown keys {sorted(unknown)}")
        source = MixSource(**spec)
    elif isinstance(spec, Sequence) and not isinstance(spec, str) and 3 <= len(spec) <= 4:
        source = MixSource(*spec)
    else:
        raise DataError(
            f"mix source {spec!r}: expected (format, path, fraction[, split]) or a mapping"
        )
    get_format(source.format)
    fraction = source.fraction
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 1
    ):
        raise DataError(
            f"mix source {source.label!r}: fraction must be in (0, 1], got {source.fraction}"
        )
    return source


def take_count(fraction: float, available: int) -> int:
    """Rounded share of `available`, at least one: a source named in the config never vanishes
    from the mix just because a small sample rounds to zero."""
    if available == 0:
        return 0
    return min(available, max(1, math.floor(fraction * available + 0.5)))


def build_mix(
    sources: Sequence[MixSource | Sequence[Any] | Mapping[str, Any]],
    seed: int,
    unit: str = "dialogues",
) -> Mix:
    """Reads every source, keeps its fraction and shuffles all examples together.

    Fractions are of the dialogues that give at least one pair (a one-turn dialogue has no
    reply to learn from). The choice inside each source depends only on (seed, source label),
    so adding a source does not change what the others contribute; the final order depends
    on the seed.
    """
    if unit not in UNITS:
        raise DataError(f"unit must be one of {UNITS}, got {unit!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an int, got {seed!r}")
    parsed = [as_source(spec) for spec in sources]
    labels = [s.label for s in parsed]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise DataError(f"mix sources share the names {duplicates}; give each a distinct `name`")

    examples: list[Example] = []
    reports = []
    for source in parsed:
        corpus = load_corpus(source.format, source.path, source.split, source.on_error)
        with_pairs = [d for d in corpus.dialogues if d]
        rng = random.Random(f"{seed}:{source.label}")
        if unit == "dialogues":
            chosen = rng.sample(
                range(len(with_pairs)), take_count(source.fraction, len(with_pairs))
            )
            selected = [with_pairs[i] for i in sorted(chosen)]
        else:
            pairs = [example for dialogue in with_pairs for example in dialogue]
            chosen = rng.sample(range(len(pairs)), take_count(source.fraction, len(pairs)))
            picked = [pairs[i] for i in sorted(chosen)]
            selected = _regroup(picked)
        taken = [example for dialogue in selected for example in dialogue]
        examples.extend(taken)
        reports.append(
            SourceReport(
                name=source.label,
                format=source.format,
                path=source.path,
                split=source.split,
                fraction=source.fraction,
                dialogues_available=len(with_pairs),
                dialogues_selected=len(selected),
                pairs_available=sum(len(d) for d in with_pairs),
                pairs_selected=len(taken),
                skipped=corpus.skipped,
                by_style=_by_style(selected),
            )
        )
    random.Random(seed).shuffle(examples)
    return Mix(examples=examples, sources=tuple(reports), seed=seed, unit=unit)


def _regroup(examples: list[Example]) -> list[list[Example]]:
    """Consecutive examples of one dialogue, regrouped so dialogue counts stay meaningful."""
    groups: list[list[Example]] = []
    for example in examples:
        if groups and groups[-1][0].dialogue_id == example.dialogue_id:
            groups[-1].append(example)
        else:
            groups.append([example])
    return groups


def _by_style(dialogues: Sequence[Sequence[Example]]) -> dict[str, StyleCount]:
    counts = {}
    for style in STYLES:
        chosen = [d for d in dialogues if d[0].style == style]
        if chosen:
            langs = tuple(sorted({e.lang for d in chosen for e in d}))
            counts[style] = StyleCount(len(chosen), sum(len(d) for d in chosen), langs)
    return counts


def count_by_source_and_style(mix: Mix) -> dict[str, dict[str, int]]:
    """Selected pairs per source label and style, e.g. {"esconv": {"empathy": 120}}."""
    return {r.name: {style: c.pairs for style, c in r.by_style.items()} for r in mix.sources}


def count_by_style(mix: Mix) -> dict[str, int]:
    totals = dict.fromkeys(STYLES, 0)
    for example in mix.examples:
        totals[example.style] += 1
    return totals


def summary_table(mix: Mix) -> str:
    """A plain-text table of the mix, one row per source and style, with totals."""
    header = ("source", "split", "fraction", "style", "lang", "dialogues", "pairs", "skipped")
    rows = []
    for r in mix.sources:
        for style, c in (r.by_style or {"-": StyleCount(0, 0, ())}).items():
            rows.append(
                (
                    r.name,
                    r.split or "-",
                    f"{r.fraction:g}",
                    style,
                    ",".join(c.langs) or "-",
                    f"{c.dialogues}/{r.dialogues_available}",
                    f"{c.pairs}/{r.pairs_available}",
                    str(r.skipped),
                )
            )
    for style, pairs in count_by_style(mix).items():
        dialogues = sum(r.by_style[style].dialogues for r in mix.sources if style in r.by_style)
        rows.append(("total", "", "", style, "", str(dialogues), str(pairs), ""))
    total_dialogues = sum(r.dialogues_selected for r in mix.sources)
    total_skipped = sum(r.skipped for r in mix.sources)
    rows.append(
        (
            "total",
            "",
            "",
            "all",
            "",
            str(total_dialogues),
            str(len(mix.examples)),
            str(total_skipped),
        )
    )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    title = f"data mix: seed {mix.seed}, fractions count {mix.unit}, selected/available"
    body = [line(row) for row in rows[: -len(STYLES) - 1]]
    totals = [line(row) for row in rows[-len(STYLES) - 1 :]]
    return "\n".join([title, line(header), rule, *body, rule, *totals])
