"""The data mix: fractions, seeds, counts and the summary table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lisendiff_jax.data import (
    PAPER_FRACTIONS,
    DataError,
    MixSource,
    build_mix,
    count_by_source_and_style,
    count_by_style,
    sample_path,
    summary_table,
)
from lisendiff_jax.data.mix import take_count


def corpus(path: Path, n: int, style: str, prefix: str, lang: str = "en") -> Path:
    """`n` dialogues of three turns each, so every dialogue gives two pairs."""
    lines = []
    for i in range(n):
        turns = [{"text": f"{prefix}{i} turn {k}"} for k in range(3)]
        lines.append(
            json.dumps({"id": f"{prefix}{i}", "lang": lang, "style": style, "turns": turns})
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def two_sources(tmp_path: Path) -> list[MixSource]:
    daily = corpus(tmp_path / "daily.jsonl", 20, "default", "d")
    empathy = corpus(tmp_path / "empathy.jsonl", 10, "empathy", "e", lang="ja")
    return [
        MixSource("jsonl", str(daily), 0.5, name="daily"),
        MixSource("jsonl", str(empathy), 0.2, name="empathy"),
    ]


def test_fractions_count_dialogues(two_sources: list[MixSource]) -> None:
    mix = build_mix(two_sources, seed=0)
    daily, empathy = mix.sources
    assert (daily.dialogues_available, daily.dialogues_selected) == (20, 10)
    assert (empathy.dialogues_available, empathy.dialogues_selected) == (10, 2)
    assert (daily.pairs_selected, empathy.pairs_selected) == (20, 4)
    assert len(mix.examples) == 24
    # All replies of a chosen dialogue come along.
    ids = [e.dialogue_id for e in mix.examples]
    assert all(ids.count(i) == 2 for i in ids)


def test_fractions_can_count_pairs(two_sources: list[MixSource]) -> None:
    mix = build_mix(two_sources, seed=0, unit="pairs")
    assert [s.pairs_selected for s in mix.sources] == [20, 4]
    assert [s.pairs_available for s in mix.sources] == [40, 20]


def test_counts_per_source_and_style(two_sources: list[MixSource]) -> None:
    mix = build_mix(two_sources, seed=3)
    assert count_by_source_and_style(mix) == {"daily": {"default": 20}, "empathy": {"empathy": 4}}
    assert count_by_style(mix) == {"default": 20, "empathy": 4}
    assert {e.lang for e in mix.examples if e.style == "empathy"} == {"ja"}


def test_same_seed_same_examples_other_seed_differs(two_sources: list[MixSource]) -> None:
    first = build_mix(two_sources, seed=7).examples
    assert build_mix(two_sources, seed=7).examples == first
    assert build_mix(two_sources, seed=8).examples != first


def test_shuffled_across_sources(two_sources: list[MixSource]) -> None:
    names = [e.dialogue_id[0] for e in build_mix(two_sources, seed=0).examples]
    assert names != sorted(names) and names != sorted(names, reverse=True)


def test_a_source_choice_does_not_depend_on_the_others(two_sources: list[MixSource]) -> None:
    alone = build_mix(two_sources[:1], seed=5).examples
    together = build_mix(two_sources, seed=5).examples
    assert {e.dialogue_id for e in alone} == {
        e.dialogue_id for e in together if e.style == "default"
    }


def test_tuple_and_mapping_sources(tmp_path: Path) -> None:
    path = str(corpus(tmp_path / "c.jsonl", 4, "default", "c"))
    from_tuple = build_mix([("jsonl", path, 0.5)], seed=1)
    from_mapping = build_mix([{"format": "jsonl", "path": path, "fraction": 0.5}], seed=1)
    assert from_tuple.examples == from_mapping.examples
    assert from_tuple.sources[0].dialogues_selected == 2


def test_take_count_rounds_and_keeps_at_least_one() -> None:
    assert take_count(0.5, 20) == 10
    assert take_count(0.03, 13118) == 394
    assert take_count(0.01, 30) == 1
    assert take_count(1.0, 7) == 7
    assert take_count(0.5, 0) == 0


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([("jsonl", "x", 0.0)], "fraction must be in"),
        ([("jsonl", "x", 1.5)], "fraction must be in"),
        ([("reddit", "x", 0.5)], "unknown corpus format"),
        ([("jsonl",)], "expected \\(format, path, fraction"),
        ([{"format": "jsonl", "path": "x", "fraction": 0.5, "weight": 2}], "unknown keys"),
    ],
)
def test_bad_sources(sources: list, message: str) -> None:
    with pytest.raises(DataError, match=message):
        build_mix(sources, seed=0)


def test_duplicate_names_and_bad_unit(two_sources: list[MixSource]) -> None:
    with pytest.raises(DataError, match="distinct"):
        build_mix([two_sources[0], two_sources[0]], seed=0)
    with pytest.raises(DataError, match="unit"):
        build_mix(two_sources, seed=0, unit="tokens")


def test_skipped_rows_are_reported_per_source(tmp_path: Path) -> None:
    path = corpus(tmp_path / "c.jsonl", 4, "default", "c")
    path.write_text(path.read_text() + "{broken\n")
    with pytest.warns(UserWarning, match="skipped 1"):
        mix = build_mix([MixSource("jsonl", str(path), 1.0, on_error="skip")], seed=0)
    assert mix.sources[0].skipped == 1
    assert summary_table(mix).splitlines()[-1].split()[-1] == "1"
    with pytest.raises(DataError, match="c.jsonl:5"):
        build_mix([MixSource("jsonl", str(path), 1.0)], seed=0)


def test_skipped_rows_are_reported_once(tmp_path: Path) -> None:
    """One line on stderr per source with skipped rows, as a user running training sees it
    (in a fresh interpreter: pytest would capture both the warning and a log record)."""
    path = corpus(tmp_path / "c.jsonl", 4, "default", "c")
    path.write_text(path.read_text() + "{broken\n")
    code = (
        "from lisendiff_jax.data import MixSource, build_mix; "
        f"build_mix([MixSource('jsonl', {str(path)!r}, 1.0, on_error='skip')], seed=0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("skipped 1 malformed row(s)") == 1, run.stderr


def test_summary_table(two_sources: list[MixSource]) -> None:
    table = summary_table(build_mix(two_sources, seed=0))
    lines = table.splitlines()
    assert "seed 0" in lines[0] and "dialogues" in lines[0]
    assert lines[1].split() == [
        "source",
        "split",
        "fraction",
        "style",
        "lang",
        "dialogues",
        "pairs",
        "skipped",
    ]
    assert lines[3].split() == ["daily", "-", "0.5", "default", "en", "10/20", "20/40", "0"]
    assert lines[4].split() == ["empathy", "-", "0.2", "empathy", "ja", "2/10", "4/20", "0"]
    assert lines[-1].split() == ["total", "all", "12", "24", "0"]


def test_paper_mix_on_the_bundled_samples() -> None:
    formats = ["daily_dialog", "esconv", "j_daily_dialog", "j_empathetic_dialogues"]
    sources = [(f, str(sample_path(f)), PAPER_FRACTIONS[f]) for f in formats]
    mix = build_mix(sources, seed=0)
    assert [s.dialogues_selected for s in mix.sources] == [1, 3, 3, 6]
    assert set(count_by_style(mix).values()) != {0}
    assert {(e.style, e.lang) for e in mix.examples} == {
        ("default", "en"),
        ("empathy", "en"),
        ("default", "ja"),
        ("empathy", "ja"),
    }
