"""Simulated conversations: a speaker model role-plays a person in an emotional situation and
the listener under test answers, for a few turns (the paper's section 4.6).

The speaker's prompt is ours and follows the paper's rules: talk about your own situation and
nothing else, keep every turn short, and say how you feel in the first turn. For Mandarin
("zh") and Cantonese ("yue") it is written in that language, so the speaker speaks it; for any
other language it is in English and tells the speaker to speak that language, by its name.

Transcripts go to a JSONL file, one finished conversation per line; running again with the
same file skips the conversations already there, so an interrupted run resumes without
repeating or losing one. A conversation that fails (after the client's retries) is not
written, the others go on, and the run then raises `SimulationError` naming the failures.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

from lisendiff_jax.data.bundled import Situation
from lisendiff_jax.data.languages import describe, is_language_tag, language_name
from lisendiff_jax.evaluation.client import Chat
from lisendiff_jax.evaluation.jobs import run_jobs
from lisendiff_jax.evaluation.transcripts import ResultsFile

SPEAKER_PROMPTS: Mapping[str, str] = {
    "zh": (
        "请你扮演一个真实的人，正在和一位愿意倾听的人聊天。\n"
        "你的处境：{situation}\n你现在的心情：{emotion}\n"
        "规则：\n"
        "1. 只谈你自己的处境和感受，不要安慰对方，也不要问对方自己的事。\n"
        "2. 每次只说一两句话，像平时聊天一样简短自然。\n"
        "3. 第一句话就说出你现在的感受。\n"
        "4. 用普通话（简体中文）说话，不要提到你在扮演角色。"
    ),
    "yue": (
        "請你扮演一個真實嘅人，同一個肯聽你講嘢嘅人傾偈。\n"
        "你嘅處境：{situation}\n你而家嘅心情：{emotion}\n"
        "規則：\n"
        "1. 淨係講你自己嘅處境同感受，唔好安慰對方，亦唔好問對方自己嘅事。\n"
        "2. 每次只講一兩句，好似平時傾偈咁簡短自然。\n"
        "3. 第一句就講出你而家嘅感受。\n"
        "4. 用廣東話口語講，唔好提你喺度扮演角色。"
    ),
}
# Chat endpoints answer a user turn: this one asks the speaker to open the conversation.
OPENERS: Mapping[str, str] = {
    "zh": "（请开始聊天，说出你的第一句话。）",
    "yue": "（請開始傾偈，講你第一句說話。）",
}
# Every other language: the same rules in English, naming the language to speak.
SPEAKER_PROMPT = (
    "Play a real person who is chatting with someone willing to listen.\n"
    "Your situation: {situation}\nHow you feel now: {emotion}\n"
    "Rules:\n"
    "1. Talk only about your own situation and feelings; do not comfort the other person and "
    "do not ask about their affairs.\n"
    "2. Say one or two sentences at a time, short and natural as in everyday chat.\n"
    "3. Say how you feel in your very first sentence.\n"
    "4. Speak {language} only, and never mention that you are playing a role."
)
OPENER = "(Please start the conversation: say your first sentence, in {language}.)"


class SimulationError(RuntimeError):
    """Some conversations failed; the finished ones are saved and a rerun retries the rest."""


def speaker_messages(situation: Situation, turns: Sequence[dict]) -> list[dict]:
    """The speaker's view: its own turns are the assistant's, the listener's the user's."""
    lang = situation.lang
    if not is_language_tag(lang):
        raise ValueError(f"{situation.id}: no speaker prompt for language {describe(lang)}")
    language = language_name(lang)
    prompt = SPEAKER_PROMPTS.get(lang, SPEAKER_PROMPT).format(
        situation=situation.situation, emotion=situation.emotion, language=language
    )
    messages = [
        {"role": "system", "content": prompt},
        {"role": "user", "content": OPENERS.get(lang, OPENER).format(language=language)},
    ]
    for turn in turns:
        role = "assistant" if turn["role"] == "speaker" else "user"
        messages.append({"role": role, "content": turn["text"]})
    return messages


def listener_messages(turns: Sequence[dict]) -> list[dict]:
    """The listener's view: the speaker is the user. No system message: each listener system
    brings its own (ours, the one it was trained with)."""
    return [
        {"role": "user" if t["role"] == "speaker" else "assistant", "content": t["text"]}
        for t in turns
    ]


def converse(
    situation: Situation,
    speaker: Chat,
    listener: Chat,
    turns: int = 3,
    speaker_sampling: Mapping[str, Any] = {},
    listener_sampling: Mapping[str, Any] = {},
) -> list[dict]:
    """`turns` exchanges: the speaker talks, the listener replies."""
    transcript: list[dict] = []
    for _ in range(turns):
        said = speaker.complete(speaker_messages(situation, transcript), **speaker_sampling)
        transcript.append({"role": "speaker", "text": said.strip()})
        heard = listener.complete(listener_messages(transcript), **listener_sampling)
        transcript.append({"role": "listener", "text": heard.strip()})
    return transcript


def simulate(
    situations: Sequence[Situation],
    speaker: Chat,
    listener: Chat,
    system: str,
    out: str | os.PathLike,
    turns: int = 3,
    workers: int = 4,
    speaker_sampling: Mapping[str, Any] = {},
    listener_sampling: Mapping[str, Any] = {},
) -> list[dict]:
    """Conversations of listener `system` on every situation not yet in `out`; returns all of
    the system's transcripts in `out`. Records: id, system, lang, emotion, situation, turns."""
    results = ResultsFile(out, ("system", "id"))
    done = results.done()
    todo = [s for s in situations if (system, s.id) not in done]
    for situation in todo:  # a language without a prompt fails now, not half way through
        speaker_messages(situation, [])

    def run(situation: Situation) -> None:
        transcript = converse(
            situation, speaker, listener, turns, speaker_sampling, listener_sampling
        )
        results.append(
            {
                "id": situation.id,
                "system": system,
                "lang": situation.lang,
                "emotion": situation.emotion,
                "situation": situation.situation,
                "turns": transcript,
            }
        )

    _, errors = run_jobs({s.id: functools.partial(run, s) for s in todo}, workers)
    failures = [f"{name}: {err!r}" for name, err in errors.items()]
    if failures:
        raise SimulationError(
            f"{len(failures)} of {len(todo)} conversation(s) failed; rerun to retry them: "
            + "; ".join(sorted(failures))
        )
    return [r for r in results.records if r["system"] == system]
