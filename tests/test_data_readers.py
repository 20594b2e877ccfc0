"""Each corpus reader on small files written here in the corpus's own format."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import openpyxl
import pytest

from lisendiff_jax.data import (
    FORMATS,
    DataError,
    Example,
    SkippedRowsWarning,
    load_corpus,
    load_pairs,
)

ED_HEADER = "conv_id,utterance_idx,context,prompt,speaker_idx,utterance,selfeval,tags"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def pairs(examples: list[Example]) -> list[tuple[list[str], str]]:
    return [(e.context, e.response) for e in examples]


def ed_row(conv: str, idx: int, speaker: int, text: str, extra: str = "") -> str:
    row = f"{conv},{idx},joyful,A situation_comma_ told briefly,{speaker},{text},5|5|5_4|4|4,"
    return row + extra


# ---------------------------------------------------------------- EmpatheticDialogues


def ed_file(tmp_path: Path, name: str = "train.csv", rows: list[str] | None = None) -> Path:
    rows = rows or [
        ed_row("hit:1_conv:1", 1, 7, "I got a puppy_comma_ finally!"),
        ed_row("hit:1_conv:1", 2, 8, "Congrats! What breed?"),
        ed_row("hit:1_conv:1", 3, 7, "A beagle."),
        # An extra candidates field beyond the 8 header columns, as in the released files.
        ed_row(
            "hit:1_conv:1", 4, 8, "Beagles are lovely_comma_ enjoy!", ",Nice!|So cute_comma_ wow"
        ),
        # Out of order on disk, and the listener's first turn is empty.
        ed_row("hit:2_conv:2", 2, 5, ""),
        ed_row("hit:2_conv:2", 1, 4, "I failed my test."),
        ed_row("hit:2_conv:2", 3, 4, "I studied so hard."),
        ed_row("hit:2_conv:2", 4, 5, "That is rough."),
    ]
    return write(tmp_path / name, "\n".join([ED_HEADER, *rows]) + "\n")


def test_ed_listener_is_second_speaker_with_unescaped_commas(tmp_path: Path) -> None:
    examples = load_pairs("empathetic_dialogues", ed_file(tmp_path))
    assert pairs(examples) == [
        (["I got a puppy, finally!"], "Congrats! What breed?"),
        (
            ["I got a puppy, finally!", "Congrats! What breed?", "A beagle."],
            "Beagles are lovely, enjoy!",
        ),
        (["I failed my test.", "I studied so hard."], "That is rough."),
    ]
    assert {(e.style, e.lang, e.source) for e in examples} == {
        ("empathy", "en", "empathetic_dialogues")
    }
    assert [e.dialogue_id for e in examples] == ["hit:1_conv:1"] * 2 + ["hit:2_conv:2"]


def test_ed_directory_picks_the_split(tmp_path: Path) -> None:
    ed_file(tmp_path)
    ed_file(tmp_path, "valid.csv", [ed_row("v", 1, 1, "Hi."), ed_row("v", 2, 2, "Hello.")])
    assert len(load_pairs("empathetic_dialogues", tmp_path)) == 3  # train by default
    for split in ("valid", "validation"):
        valid = load_pairs("empathetic_dialogues", tmp_path, split=split)
        assert pairs(valid) == [(["Hi."], "Hello.")]
    with pytest.raises(DataError, match="test.csv"):
        load_pairs("empathetic_dialogues", tmp_path, split="test")


def test_ed_malformed_row_names_file_and_line(tmp_path: Path) -> None:
    file = ed_file(tmp_path, rows=[ed_row("c", 1, 1, "Hi."), "c,2,joyful,only five"])
    with pytest.raises(DataError, match=re.escape(f"{file}:3: expected 8")):
        load_pairs("empathetic_dialogues", file)
    file = ed_file(tmp_path, rows=[ed_row("c", "x", 1, "Hi.")])
    with pytest.raises(DataError, match=re.escape(f"{file}:2: utterance_idx")):
        load_pairs("empathetic_dialogues", file)


def test_ed_bad_header(tmp_path: Path) -> None:
    file = write(tmp_path / "train.csv", "a,b,c\n" + ed_row("c", 1, 1, "Hi.") + "\n")
    with pytest.raises(DataError, match=re.escape(f"{file}:1: expected the header")):
        load_pairs("empathetic_dialogues", file)


def test_ed_skip_drops_the_damaged_conversation_and_counts(tmp_path: Path) -> None:
    rows = [
        ed_row("good", 1, 1, "Hi."),
        ed_row("good", 2, 2, "Hello."),
        ed_row("bad", 1, 3, "One."),
        "bad,2,joyful,short",
        ed_row("bad", 3, 3, "Three."),
    ]
    file = ed_file(tmp_path, rows=rows)
    with pytest.warns(SkippedRowsWarning, match="skipped 1"):
        corpus = load_corpus("empathetic_dialogues", file, on_error="skip")
    assert corpus.skipped == 1
    assert corpus.problems[0].startswith(f"{file}:5:")
    assert "skipped conversation 'bad'" in corpus.problems[0]
    assert pairs(corpus.examples) == [(["Hi."], "Hello.")]


# ---------------------------------------------------------------- DailyDialog

DD_TEXT = (
    "Hi , how are you ? __eou__ Fine , thanks . __eou__ Glad to hear it . __eou__\n"
    "Is it raining ? __eou__  __eou__ I think so . __eou__\n"
    "\n"
)


def test_daily_dialog_every_turn_after_the_first(tmp_path: Path) -> None:
    examples = load_pairs("daily_dialog", write(tmp_path / "dialogues_text.txt", DD_TEXT))
    assert pairs(examples) == [
        (["Hi , how are you ?"], "Fine , thanks ."),
        (["Hi , how are you ?", "Fine , thanks ."], "Glad to hear it ."),
        # The empty middle turn is dropped, not turned into a response.
        (["Is it raining ?"], "I think so ."),
    ]
    assert {(e.style, e.lang) for e in examples} == {("default", "en")}
    assert examples[-1].dialogue_id == "dialogues_text.txt:2"


def test_daily_dialog_splits(tmp_path: Path) -> None:
    write(tmp_path / "dialogues_text.txt", DD_TEXT)
    write(tmp_path / "train" / "dialogues_train.txt", "A . __eou__ B . __eou__\n")
    write(tmp_path / "dialogues_validation.txt", "C . __eou__ D . __eou__ E . __eou__\n")
    assert len(load_pairs("daily_dialog", tmp_path)) == 3
    assert pairs(load_pairs("daily_dialog", tmp_path, split="train")) == [(["A ."], "B .")]
    for split in ("validation", "valid"):
        assert len(load_pairs("daily_dialog", tmp_path, split=split)) == 2


def test_daily_dialog_malformed_line(tmp_path: Path) -> None:
    file = write(tmp_path / "dialogues_text.txt", "A . __eou__ B . __eou__\nno separator here\n")
    with pytest.raises(DataError, match=re.escape(f"{file}:2: no __eou__")):
        load_pairs("daily_dialog", file)
    file = write(tmp_path / "dialogues_text.txt", "A . __eou__ B . __eou__ cut off\n")
    with pytest.raises(DataError, match=re.escape(f"{file}:1: the line does not end")):
        load_pairs("daily_dialog", file)


def test_daily_dialog_skip(tmp_path: Path) -> None:
    file = write(tmp_path / "d.txt", "bad\nA . __eou__ B . __eou__\nalso bad\n")
    with pytest.warns(SkippedRowsWarning):
        corpus = load_corpus("daily_dialog", file, on_error="skip")
    assert corpus.skipped == 2
    assert [p.split(": ")[0] for p in corpus.problems] == [f"{file}:1", f"{file}:3"]
    assert pairs(corpus.examples) == [(["A ."], "B .")]


# ---------------------------------------------------------------- ESConv

ESCONV_DIALOGUE = {
    "emotion_type": "anxiety",
    "problem_type": "job crisis",
    "situation": "Worried about work.",
    "dialog": [
        {"speaker": "supporter", "annotation": {"strategy": "Question"}, "content": "Hello!"},
        {"speaker": "seeker", "annotation": {}, "content": "Hi.\n"},
        {"speaker": "seeker", "annotation": {}, "content": "I may lose my job."},
        {"speaker": "supporter", "annotation": {}, "content": "That sounds stressful."},
        {"speaker": "supporter", "annotation": {}, "content": "   "},
        {"speaker": "supporter", "annotation": {}, "content": "What happened?"},
        {"speaker": "seeker", "annotation": {}, "content": "Cuts."},
        {"speaker": "supporter", "annotation": {}, "content": "I see."},
    ],
}
ESCONV_PAIRS = [
    (["Hello!", "Hi. I may lose my job."], "That sounds stressful. What happened?"),
    (
        ["Hello!", "Hi. I may lose my job.", "That sounds stressful. What happened?", "Cuts."],
        "I see.",
    ),
]


def test_esconv_merges_consecutive_turns_and_answers_with_the_supporter(tmp_path: Path) -> None:
    write(tmp_path / "ESConv.json", json.dumps([ESCONV_DIALOGUE], indent=2))
    examples = load_pairs("esconv", tmp_path)
    assert pairs(examples) == ESCONV_PAIRS
    assert {(e.style, e.lang, e.source) for e in examples} == {("empathy", "en", "esconv")}


def test_esconv_hub_forms(tmp_path: Path) -> None:
    as_string = json.dumps(ESCONV_DIALOGUE)
    rows = write(tmp_path / "train.json", json.dumps({"text": as_string}) + "\n")
    assert pairs(load_pairs("esconv", rows)) == ESCONV_PAIRS
    strings = write(tmp_path / "strings.json", json.dumps([as_string, as_string]))
    assert pairs(load_pairs("esconv", strings)) == ESCONV_PAIRS * 2
    # A split directory as on the hub.
    write(tmp_path / "hub" / "validation.json", json.dumps({"text": as_string}) + "\n")
    assert pairs(load_pairs("esconv", tmp_path / "hub", split="validation")) == ESCONV_PAIRS


def test_esconv_malformed(tmp_path: Path) -> None:
    bad = {"dialog": [{"speaker": "robot", "content": "Hi"}]}
    file = write(tmp_path / "ESConv.json", json.dumps([ESCONV_DIALOGUE, bad]))
    with pytest.raises(DataError, match=re.escape(f"{file}: dialogue 1: turn 0: speaker")):
        load_pairs("esconv", file)
    file = write(tmp_path / "ESConv.json", '[\n  {"dialog": [}\n]')
    with pytest.raises(DataError, match=re.escape(f"{file}:2: invalid JSON")):
        load_pairs("esconv", file)
    file = write(tmp_path / "rows.jsonl", '{"text": "{}"}\n{"text": "{not json"}\n')
    with pytest.raises(DataError, match=re.escape(f"{file}:1: missing field 'dialog'")):
        load_pairs("esconv", file)


def test_esconv_skip(tmp_path: Path) -> None:
    good = json.dumps({"text": json.dumps(ESCONV_DIALOGUE)})
    file = write(tmp_path / "rows.jsonl", f'{good}\n{{"text": "{{not json"}}\n{good}\n')
    with pytest.warns(SkippedRowsWarning):
        corpus = load_corpus("esconv", file, on_error="skip")
    assert corpus.skipped == 1
    assert corpus.problems[0].startswith(f"{file}:2: invalid JSON")
    assert len(corpus.dialogues) == 2


# ---------------------------------------------------------------- J-DailyDialog


def jdd_dialogue(dialogue_id: int, turns: list[tuple[int, str, str]]) -> dict:
    return {
        "topic_id": 1,
        "topic_name": "Dailylife",
        "dialogue_id": dialogue_id,
        "dialogue_length": len(turns),
        "utterances": [{"turn_num": n, "speaker": s, "utterance": u} for n, s, u in turns],
    }


def test_j_daily_dialog_directory_of_topics(tmp_path: Path) -> None:
    first = jdd_dialogue(
        1, [(2, "B", "おはよう。"), (1, "A", "おはようございます。"), (3, "A", "")]
    )
    second = jdd_dialogue(7, [(1, "A", "雨だね。"), (2, "B", "傘ある？"), (3, "A", "あるよ。")])
    write(tmp_path / "data" / "topic1.json", json.dumps([first], ensure_ascii=False))
    write(tmp_path / "data" / "topic2.json", json.dumps([second], ensure_ascii=False))
    write(tmp_path / "data" / "README.json", "not a topic file")
    examples = load_pairs("j_daily_dialog", tmp_path)
    assert pairs(examples) == [
        (["おはようございます。"], "おはよう。"),
        (["雨だね。"], "傘ある？"),
        (["雨だね。", "傘ある？"], "あるよ。"),
    ]
    assert {(e.style, e.lang) for e in examples} == {("default", "ja")}
    assert examples[0].dialogue_id == "topic1:1"


def test_j_daily_dialog_malformed_and_skip(tmp_path: Path) -> None:
    good = jdd_dialogue(1, [(1, "A", "こんにちは。"), (2, "B", "こんにちは。")])
    bad = {"dialogue_id": 2, "utterances": [{"turn_num": "x", "speaker": "A", "utterance": "a"}]}
    file = write(tmp_path / "topic_9.json", json.dumps([good, bad]))
    with pytest.raises(DataError, match=re.escape(f"{file}: dialogue 1: dialogue_id 2")):
        load_pairs("j_daily_dialog", file)
    with pytest.warns(SkippedRowsWarning):
        corpus = load_corpus("j_daily_dialog", file, on_error="skip")
    assert (corpus.skipped, len(corpus.examples)) == (1, 1)


# ---------------------------------------------------------------- J-EmpatheticDialogues


def workbook(
    path: Path,
    situations: list[list[object]],
    dialogue: list[list[object]],
    headers: tuple[list[str], list[str]] = (
        ["ID", "emotion", "situation"],
        ["ID", "speaker", "utterance"],
    ),
) -> Path:
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "situations"
    for row in [headers[0], *situations]:
        sheet.append(row)
    sheet = book.create_sheet("dialogues")
    for row in [headers[1], *dialogue]:
        sheet.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    book.save(path)
    return path


J_ED_SITUATIONS = [["1_1", "うれしい", "合格した。"], ["2_1", "悲しい", "犬が死んだ。"]]
J_ED_DIALOGUE = [
    ["1_1", "A", "試験に合格しました！"],
    ["1_1", "B", "おめでとうございます！"],
    ["1_1", "A", "ずっと頑張ってきたんです。"],
    ["1_1", "B", "努力が実りましたね。"],
    ["2_1", "A", "犬が死んでしまいました。"],
    ["2_1", "B", None],
    ["2_1", "A", "とても寂しいです。"],
    ["2_1", "B", "おつらいですね。"],
    [None, None, None],  # an empty trailing row, as spreadsheets often have
]


def test_j_ed_listener_of_each_dialogue(tmp_path: Path) -> None:
    file = workbook(tmp_path / "jed.xlsx", J_ED_SITUATIONS, J_ED_DIALOGUE)
    write(tmp_path / "~$jed.xlsx", "an Excel lock file, not a workbook")
    examples = load_pairs("j_empathetic_dialogues", tmp_path)
    assert pairs(examples) == [
        (["試験に合格しました！"], "おめでとうございます！"),
        (
            ["試験に合格しました！", "おめでとうございます！", "ずっと頑張ってきたんです。"],
            "努力が実りましたね。",
        ),
        (["犬が死んでしまいました。", "とても寂しいです。"], "おつらいですね。"),
    ]
    assert {(e.style, e.lang) for e in examples} == {("empathy", "ja")}
    assert [e.dialogue_id for e in examples] == ["1_1", "1_1", "2_1"]
    assert load_pairs("j_empathetic_dialogues", file) == examples


def test_j_ed_japanese_headers_and_per_utterance_ids(tmp_path: Path) -> None:
    dialogue = [
        ["1_1_1", "聞き手", "こんにちは。"],  # a labelled listener, even when speaking first
        ["1_1_2", "話し手", "昇進しました。"],
        ["1_1_3", "聞き手", "すごいですね！"],
    ]
    headers = (["ID", "感情", "状況文"], ["ID", "話者", "発話"])
    workbook(tmp_path / "jed.xlsx", [["1_1", "誇らしい", "昇進した。"]], dialogue, headers)
    assert pairs(load_pairs("j_empathetic_dialogues", tmp_path)) == [
        (["こんにちは。", "昇進しました。"], "すごいですね！")
    ]


def test_j_ed_malformed_rows_and_sheets(tmp_path: Path) -> None:
    dialogue = [*J_ED_DIALOGUE[:4], ["9_9", "A", "どこにも属さない"]]
    file = workbook(tmp_path / "bad.xlsx", J_ED_SITUATIONS, dialogue)
    with pytest.raises(DataError, match=re.escape(f"{file}: sheet 'dialogues' row 6: ID '9_9'")):
        load_pairs("j_empathetic_dialogues", file)
    with pytest.warns(SkippedRowsWarning):
        corpus = load_corpus("j_empathetic_dialogues", file, on_error="skip")
    assert (corpus.skipped, len(corpus.examples)) == (1, 2)

    no_situations = workbook(
        tmp_path / "other" / "x.xlsx", [], [], (["a", "b"], ["ID", "speaker", "utterance"])
    )
    with pytest.raises(DataError, match="no sheet with the columns id, emotion, situation"):
        load_pairs("j_empathetic_dialogues", no_situations)
    not_excel = write(tmp_path / "fake" / "x.xlsx", "plain text")
    with pytest.raises(DataError, match=re.escape(f"{not_excel}: cannot open")):
        load_pairs("j_empathetic_dialogues", not_excel)


# ---------------------------------------------------------------- JSONL


def jsonl_line(**record: object) -> str:
    return json.dumps(record, ensure_ascii=False)


def test_jsonl_listener_and_per_dialogue_labels(tmp_path: Path) -> None:
    turns = [
        {"speaker": "A", "text": "我今天很难过。"},
        {"speaker": "B", "text": "发生什么事了？"},
        {"speaker": "A", "text": "考试没考好。"},
        {"speaker": "A", "text": ""},
        {"speaker": "B", "text": "下次一定可以的。"},
    ]
    lines = [
        jsonl_line(id="z1", lang="zh", style="empathy", listener="B", turns=turns),
        "",
        jsonl_line(lang="en", style="default", turns=[{"text": "Hi."}, {"text": "Hey."}]),
    ]
    file = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    examples = load_pairs("jsonl", file)
    assert pairs(examples) == [
        (["我今天很难过。"], "发生什么事了？"),
        (["我今天很难过。", "发生什么事了？", "考试没考好。"], "下次一定可以的。"),
        (["Hi."], "Hey."),
    ]
    assert [(e.style, e.lang, e.dialogue_id) for e in examples] == [
        ("empathy", "zh", "z1"),
        ("empathy", "zh", "z1"),
        ("default", "en", "d.jsonl:3"),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        (jsonl_line(lang="en", style="happy", turns=[]), "style must be one of"),
        (jsonl_line(style="default", turns=[]), "missing field 'lang'"),
        (
            jsonl_line(
                lang="en", style="empathy", listener="C", turns=[{"speaker": "A", "text": "x"}]
            ),
            "listener 'C' never speaks",
        ),
        (
            jsonl_line(lang="en", style="default", turns=[{"speaker": "A"}]),
            "turn 0: missing field 'text'",
        ),
    ],
)
def test_jsonl_malformed(tmp_path: Path, line: str, message: str) -> None:
    good = jsonl_line(lang="en", style="default", turns=[{"text": "a"}, {"text": "b"}])
    file = write(tmp_path / "d.jsonl", f"{good}\n{line}\n")
    with pytest.raises(DataError, match=re.escape(f"{file}:2: ") + ".*" + re.escape(message)):
        load_pairs("jsonl", file)
    with pytest.warns(SkippedRowsWarning):
        corpus = load_corpus("jsonl", file, on_error="skip")
    assert (corpus.skipped, len(corpus.examples)) == (1, 1)


# ---------------------------------------------------------------- shared behaviour


def test_unknown_format_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_pairs("reddit", tmp_path)
    for name in FORMATS:
        assert name in str(error.value)


@pytest.mark.parametrize("format", sorted(FORMATS))
def test_missing_path_is_named(tmp_path: Path, format: str) -> None:
    missing = tmp_path / "nowhere" / "corpus"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_pairs(format, missing)


def test_empty_directory_says_what_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dialogues_text.txt"):
        load_pairs("daily_dialog", tmp_path)
    with pytest.raises(DataError, match=re.escape("topic*.json")):
        load_pairs("j_daily_dialog", tmp_path)


def test_hub_id_never_touches_the_network_when_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="thu-coai/esconv.*hub is off"):
        load_pairs("esconv", "thu-coai/esconv")


def test_on_error_must_be_known(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="on_error"):
        load_pairs("daily_dialog", write(tmp_path / "d.txt", DD_TEXT), on_error="ignore")


def test_hub_rows_are_read_like_the_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the hub reachable, a hub id goes through `datasets`; a stand-in answers here."""
    ed_columns = ED_HEADER.split(",")
    ed_rows = [
        dict(
            zip(
                ed_columns,
                ["c1", 1, "sad", "s", 1, "I lost my keys_comma_ again.", "", ""],
                strict=True,
            )
        ),
        dict(zip(ed_columns, ["c1", 2, "sad", "s", 2, "Oh no!", "", ""], strict=True)),
    ]
    rows = {
        "facebook/empathetic_dialogues": ed_rows,
        "li2017dailydialog/daily_dialog": [{"dialog": ["Hi .", "Hello ."], "act": [1, 1]}],
        "thu-coai/esconv": [{"text": json.dumps(ESCONV_DIALOGUE)}],
    }
    calls = []

    def load_dataset(hub_id: str, split: str) -> list[dict]:
        calls.append((hub_id, split))
        return rows[hub_id]

    monkeypatch.setattr("lisendiff_jax.data.readers._common.hub_offline", lambda: False)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert pairs(load_pairs("empathetic_dialogues", "facebook/empathetic_dialogues")) == [
        (["I lost my keys, again."], "Oh no!")
    ]
    assert pairs(load_pairs("daily_dialog", "li2017dailydialog/daily_dialog", "test")) == [
        (["Hi ."], "Hello .")
    ]
    assert pairs(load_pairs("esconv", "thu-coai/esconv")) == ESCONV_PAIRS
    assert calls[1] == ("li2017dailydialog/daily_dialog", "test")
    with pytest.raises(DataError, match="no such file"):
        load_pairs("j_daily_dialog", "someone/j-daily-dialog")  # not read from the hub
