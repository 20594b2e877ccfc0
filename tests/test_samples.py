"""The bundled samples load through the readers with the expected size and labels."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lisendiff_jax.data import (
    FORMATS,
    DataError,
    load_corpus,
    load_pairs,
    load_situations,
    sample_path,
)

# format -> (dialogues, styles, langs)
EXPECTED = {
    "daily_dialog": (30, {"default"}, {"en"}),
    "empathetic_dialogues": (30, {"empathy"}, {"en"}),
    "esconv": (30, {"empathy"}, {"en"}),
    "j_daily_dialog": (30, {"default"}, {"ja"}),
    "j_empathetic_dialogues": (30, {"empathy"}, {"ja"}),
    "jsonl": (8, {"default", "empathy"}, {"en", "ja", "zh", "yue", "fr"}),
}


def test_every_format_has_a_sample() -> None:
    assert set(EXPECTED) == set(FORMATS)


@pytest.mark.parametrize("format", sorted(EXPECTED))
def test_sample_loads(format: str) -> None:
    dialogues, styles, langs = EXPECTED[format]
    corpus = load_corpus(format, sample_path(format))
    assert len(corpus.dialogues) == dialogues
    assert all(corpus.dialogues), "every sample dialogue gives at least one pair"
    assert corpus.skipped == 0
    assert {e.style for e in corpus.examples} == styles
    assert {e.lang for e in corpus.examples} == langs
    lengths = [len(d[-1].context) + 1 for d in corpus.dialogues]
    assert min(lengths) >= 3 and max(lengths) <= 8


def test_daily_dialog_label_files_align_with_the_turns() -> None:
    folder = sample_path("daily_dialog")
    texts = (folder / "dialogues_text.txt").read_text(encoding="utf-8").splitlines()
    for name in ("dialogues_emotion.txt", "dialogues_act.txt"):
        labels = (folder / name).read_text(encoding="utf-8").splitlines()
        assert len(labels) == len(texts)
        for text, row in zip(texts, labels, strict=True):
            assert len(row.split()) == text.count("__eou__")
            assert all(value.isdigit() for value in row.split())


def test_ed_sample_has_the_awkward_rows() -> None:
    lines = (sample_path("empathetic_dialogues") / "train.csv").read_text("utf-8").splitlines()
    assert lines[0] == "conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags"
    assert any("_comma_" in line for line in lines[1:])
    assert sum(len(line.split(",")) > 8 for line in lines[1:]) >= 2
    examples = load_pairs("empathetic_dialogues", sample_path("empathetic_dialogues"))
    assert not any("_comma_" in e.response for e in examples)


def test_esconv_sample_has_consecutive_turns_by_one_speaker() -> None:
    data = json.loads((sample_path("esconv") / "ESConv.json").read_text("utf-8"))
    runs = sum(
        a["speaker"] == b["speaker"]
        for dialogue in data
        for a, b in zip(dialogue["dialog"], dialogue["dialog"][1:], strict=False)
    )
    assert runs >= 5


def test_j_ed_workbook_matches_its_build_script() -> None:
    script = sample_path("make_j_ed_xlsx.py")
    spec = importlib.util.spec_from_file_location("make_j_ed_xlsx", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    examples = load_pairs("j_empathetic_dialogues", sample_path("j_empathetic_dialogues"))
    expected = [u for _, _, utterances in module.DIALOGUES for u in utterances[1::2]]
    assert [e.response for e in examples] == expected


def test_situations() -> None:
    mandarin = load_situations(sample_path("situations/zh_mandarin.jsonl"))
    cantonese = load_situations(sample_path("situations/zh_cantonese.jsonl"))
    assert len(mandarin) >= 20 and len(cantonese) >= 20
    assert {s.lang for s in mandarin} == {"zh"} and {s.lang for s in cantonese} == {"yue"}
    for situations in (mandarin, cantonese):
        assert {s.polarity for s in situations} == {"positive", "negative"}
        assert len({s.id for s in situations}) == len(situations)
    written_cantonese = "".join(s.situation for s in cantonese)
    assert all(char in written_cantonese for char in "嘅咗唔")
    assert len(load_situations(sample_path("situations"))) == len(mandarin) + len(cantonese)


def test_bad_situation_line_is_named(tmp_path) -> None:
    file = tmp_path / "s.jsonl"
    good = {"id": "1", "lang": "zh", "polarity": "positive", "emotion": "joy", "situation": "x"}
    file.write_text(json.dumps(good) + "\n" + json.dumps({**good, "polarity": "meh"}) + "\n")
    with pytest.raises(DataError, match=f"{file}:2: polarity"):
        load_situations(file)


def test_unknown_sample_lists_the_available_ones() -> None:
    with pytest.raises(DataError, match="esconv"):
        sample_path("klingon")
