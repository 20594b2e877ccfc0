"""Any target and training language: prompts files, language names, and situations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_workdir import write_dialogues

from lisendiff_jax.config import ConfigError, base_config, load_config, load_prompts, validate
from lisendiff_jax.data.bundled import load_situations
from lisendiff_jax.data.errors import DataError
from lisendiff_jax.evaluation.judge import comparison_messages, rating_messages
from lisendiff_jax.evaluation.simulate import speaker_messages
from lisendiff_jax.infer import chat, inference
from lisendiff_jax.train import loop
from lisendiff_jax.train.loop import Trainer, _check_workdir_config

ROOT = Path(__file__).resolve().parents[1]
KOREAN = "한국어로 짧게 답하세요."  # short, so that the tiny byte-level BPE keeps it in budget
KOREAN_TURNS = ["시험에 떨어졌어요.", "정말 속상하겠어요.", "다음에는 잘할 거예요."]


def write_prompts(path: Path, prompts: dict) -> Path:
    path.write_text(json.dumps(prompts, ensure_ascii=False), encoding="utf-8")
    return path


def korean_config(tmp_path: Path, prompts: Path | None):
    """The tiny model on the four English dialogues and a Korean one, replying in Korean, with
    `prompts` as data.prompts (None: no prompts file)."""
    c = load_config(ROOT / "configs" / "tiny.py")
    for name in list(c.data.sources):
        del c.data.sources[name]
    data = write_dialogues(tmp_path / "d.jsonl")
    turns = [{"speaker": "AB"[j % 2], "text": t} for j, t in enumerate(KOREAN_TURNS)]
    with open(data, "a", encoding="utf-8") as f:
        record = {"id": "ko", "lang": "ko", "style": "empathy", "turns": turns}
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    c.data.sources.mine = dict(format="jsonl", path=str(data), fraction=1.0, split="")
    c.data.target_lang = "ko"
    c.data.prompts = "" if prompts is None else str(prompts)
    c.data.max_length = 128
    return c


def test_a_new_language_with_a_prompts_file_trains_and_samples(tmp_path, monkeypatch, capsys):
    """Training set up (mix, each example's prompt, embeddings, config.json) and checkpointed
    at step 0 as tiny_workdir.py does: the prompts enter there, not in the language-blind
    optimizer step, which would only add its compilation."""
    prompts = write_prompts(tmp_path / "prompts.json", {"ko": KOREAN})
    encoded_with, original = {}, loop.encode_examples

    def encode_examples(tokenizer, examples, system, max_length, progress):
        encoded_with.update({e.lang: system[e.lang] for e in examples})
        return original(tokenizer, examples, system, max_length, progress)

    monkeypatch.setattr(loop, "encode_examples", encode_examples)
    workdir = tmp_path / "run"
    trainer = Trainer(korean_config(tmp_path, prompts), workdir, progress=False)
    trainer.save()
    trainer.close()
    assert encoded_with["ko"] == KOREAN and encoded_with["en"] != KOREAN
    assert json.loads((workdir / "config.json").read_text())["data"]["prompt_texts"] == {
        "ko": KOREAN
    }

    # The workdir keeps the prompts: sampling needs no file, and asks in Korean by default.
    prompts.unlink()
    systems, original = [], inference.encode_chat

    def encode_chat(tokenizer, context, system, max_length, response=None):
        systems.append(system)
        return original(tokenizer, context, system, max_length, response)

    monkeypatch.setattr(inference, "encode_chat", encode_chat)
    capsys.readouterr()
    code = chat.main(
        ["--workdir", str(workdir), "--context", KOREAN_TURNS[0], "--json", "--max-tokens", "4"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    record = json.loads(out)
    assert record["lang"] == "ko" and isinstance(record["reply"], str)
    assert systems and set(systems) == {KOREAN}


def test_a_target_without_a_prompt_is_one_line_naming_it_before_any_weights(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("reached past the prompts check")

    for name in ("encode_examples", "make_encoder", "load_backbone"):
        monkeypatch.setattr(loop, name, never)
    with monkeypatch.context() as patch, pytest.raises(ConfigError) as error:
        patch.setattr(loop, "backbone_folder", never)  # not even the backbone's files
        Trainer(korean_config(tmp_path, None), tmp_path / "w", progress=False)
    assert str(error.value) == (
        "--config.data.target_lang: no system prompt for language 'ko' (Korean) (have en, ja, "
        "yue, zh); give one in a JSON file of language -> prompt with --config.data.prompts=FILE"
    )
    # Replying in Mandarin: the Korean training example still lacks a prompt.
    config = korean_config(tmp_path, None)
    config.data.target_lang = "zh"
    with pytest.raises(ConfigError) as error:
        Trainer(config, tmp_path / "w", progress=False)
    assert str(error.value).startswith(
        "--config.data.sources.mine: language 'ko' (Korean) has no system prompt (have en, ja, "
        "yue, zh); give one in a JSON file of language -> prompt with --config.data.prompts="
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such prompts file"),
        ("{not json", "not valid JSON"),
        ('["ko", "..."]', "expected a JSON object of language tag -> system prompt"),
        ("{}", "expected a JSON object of language tag -> system prompt"),
        ('{"korean": "..."}', "key 'korean' is not a language tag"),
        ('{"ko": ""}', "key 'ko': the prompt must be a non-empty string"),
        ('{"ko": 5}', "key 'ko': the prompt must be a non-empty string"),
    ],
)
def test_a_malformed_prompts_file_is_named(tmp_path, content, message):
    path = tmp_path / "prompts.json"
    if content is not None:
        path.write_text(content)
    config = base_config()
    config.data.target_lang, config.data.prompts = "ko", str(path)
    with pytest.raises(ConfigError) as error:
        load_prompts(config)
    assert str(error.value).startswith(f"--config.data.prompts: {path}: {message}")
    assert "\n" not in str(error.value)


def test_target_lang_takes_any_language_tag():
    config = base_config()
    config.data.sources.mine = dict(format="jsonl", path="x.jsonl", fraction=1.0, split="")
    config.data.target_lang = "ko"
    validate(config)
    config.data.target_lang = "korean"
    with pytest.raises(ConfigError, match=r"^--config\.data\.target_lang: 'korean' is not a "):
        validate(config)


@pytest.mark.parametrize("name, source", [("llama_ja_ko", "j_daily_dialog"), ("llama_de_ko", "de")])
def test_the_worked_example_configs_have_their_prompts(name, source):
    config = load_config(ROOT / "configs" / f"{name}.py")
    validate(config)
    load_prompts(config)
    assert config.data.target_lang == "ko" and source in config.data.sources
    assert set(config.data.prompt_texts) == {"ko", "de"}


def test_a_resume_keeps_the_prompts_not_the_files_path(tmp_path):
    config = base_config()
    config.data.prompts = str(write_prompts(tmp_path / "a.json", {"ko": KOREAN}))
    load_prompts(config)
    (tmp_path / "config.json").write_text(config.to_json())
    moved = base_config()
    moved.data.prompts = str(write_prompts(tmp_path / "b.json", {"ko": KOREAN}))
    load_prompts(moved)
    _check_workdir_config(tmp_path, moved)
    changed = base_config()
    changed.data.prompts = str(write_prompts(tmp_path / "c.json", {"ko": "다른 말."}))
    load_prompts(changed)
    with pytest.raises(ConfigError, match=r"data\.prompt_texts\.ko \('한국어로"):
        _check_workdir_config(tmp_path, changed)


def test_situations_judge_and_speaker_for_a_language_without_bundled_ones(tmp_path):
    path = tmp_path / "ko.jsonl"
    record = {"id": "ko-1", "lang": "ko", "polarity": "negative", "emotion": "sad"}
    path.write_text(json.dumps({**record, "situation": "고양이가 아파요."}, ensure_ascii=False))
    (situation,) = load_situations(path)
    assert (situation.lang, situation.situation) == ("ko", "고양이가 아파요.")
    system, opener = (m["content"] for m in speaker_messages(situation, []))
    assert "고양이가 아파요." in system and "Speak Korean only" in system and "Korean" in opener
    turns = [{"role": "speaker", "text": "슬퍼요."}, {"role": "listener", "text": "저런."}]
    for messages in (rating_messages(turns, "ko"), comparison_messages(turns, turns, "ko")):
        assert (
            "The speaker speaks Korean and the listener is meant to reply in Korean"
            in (messages[0]["content"])
        )
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n" + json.dumps({**record, "lang": "korean", "situation": "..."}) + "\n")
    with pytest.raises(DataError, match=rf"^{path}:2: lang 'korean' is not a language tag"):
        load_situations(path)
