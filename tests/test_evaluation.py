"""The evaluation's pure parts: statistics on known answers, judge-reply parsing, the A/B
order-swap rule, resuming simulations and judging after an interruption or a kill, and the
report."""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import signal

import pytest

from lisendiff_jax.data.bundled import Situation, load_situations, sample_path
from lisendiff_jax.evaluation.judge import (
    METRICS,
    JudgeFailure,
    JudgeParseError,
    ask,
    combine,
    compare,
    outcomes,
    parse_ratings,
    parse_verdicts,
    rate,
)
from lisendiff_jax.evaluation.report import ab_table, paired_table, ratings_chart, ratings_table
from lisendiff_jax.evaluation.simulate import SimulationError, simulate, speaker_messages
from lisendiff_jax.evaluation.stats import mean_ci, paired_test, sign_test, significance_mark


def test_sign_test_known_answers():
    assert sign_test(9, 1) == pytest.approx(22 / 1024)  # 2 * (1 + 10) / 2**10
    assert sign_test(5, 5) == 1.0
    assert sign_test(0, 0) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert significance_mark(0.005) == "**" and significance_mark(0.03) == "*"
    assert significance_mark(0.2) == ""


def test_mean_ci_known_answer():
    ci = mean_ci([1, 2, 3, 4, 5])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) * sd / sqrt(n)
    assert (ci.mean, ci.n) == (3, 5)
    assert (ci.low, ci.high) == pytest.approx((3 - half, 3 + half))
    assert mean_ci([4.0]) == type(ci)(4.0, 4.0, 4.0, 1)


def test_paired_test_known_answer():
    # differences 1, 2, 2, 3: mean 2, sd sqrt(2/3), t = 2 / (sd / 2) = sqrt(24)
    result = paired_test([2, 4, 5, 7], [1, 2, 3, 4])
    assert result.mean_difference == 2 and result.t == pytest.approx(math.sqrt(24))
    x = math.sqrt(8)  # t / sqrt(3): the closed form of Student's t with 3 degrees of freedom
    assert result.p == pytest.approx(1 - 2 / math.pi * (math.atan(x) + x / (1 + x * x)))
    constant = paired_test([2, 3, 4], [1, 2, 3])
    assert (constant.t, constant.p) == (math.inf, 0.0)
    assert paired_test([1, 2], [1, 2]).p == 1.0


SCORES = {m: i + 2 for i, m in enumerate(METRICS)}


@pytest.mark.parametrize(
    "reply",
    [
        json.dumps(SCORES),
        "Sure! ```json\n" + json.dumps({m.upper(): str(s) for m, s in SCORES.items()}) + "\n```",
        json.dumps({m: {"score": s, "reason": "..."} for m, s in SCORES.items()}),
        "\n".join(f"**{m.capitalize()}**: {s}/10 because..." for m, s in SCORES.items()),
    ],
)
def test_ratings_parse_from_json_or_text(reply):
    assert parse_ratings(reply) == SCORES


@pytest.mark.parametrize(
    "reply",
    [
        "I think the listener was quite nice.",
        json.dumps({**SCORES, "empathy": 11}),
        json.dumps({m: s for m, s in SCORES.items() if m != "insightful"}),
        "{broken json",
    ],
)
def test_unparseable_ratings_are_refused(reply):
    with pytest.raises(JudgeParseError):
        parse_ratings(reply)


def test_verdicts_parse():
    verdicts = {m: v for m, v in zip(METRICS, ["A", "B", "tie"] * 3, strict=False)}
    assert parse_verdicts(json.dumps({m: v.lower() for m, v in verdicts.items()})) == verdicts
    text = "\n".join(f"- {m}: {v}." for m, v in verdicts.items())
    assert parse_verdicts(text) == verdicts
    with pytest.raises(JudgeParseError):
        parse_verdicts(json.dumps(dict.fromkeys(METRICS, "C")))


def test_order_swap_rule():
    names = list(METRICS)[:5]
    first = dict(zip(names, ["A", "B", "A", "tie", "A"], strict=True))
    second = dict(zip(names, ["B", "A", "A", "B", "tie"], strict=True))  # X shown as B
    for metric in list(METRICS)[5:]:
        first[metric] = second[metric] = "tie"
    outcomes = combine(first, second)
    assert [outcomes[m] for m in names] == ["win", "lose", "tie", "tie", "tie"]
    assert all(outcomes[m] == "tie" for m in list(METRICS)[5:])


class Scripted:
    """A stand-in model answering from a list of replies, for the parts that need no server."""

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def complete(self, messages, **sampling):
        self.calls.append(sampling)
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def test_unparseable_judge_replies_are_retried_then_reported_not_counted():
    judge = Scripted(["no idea", json.dumps(SCORES)])
    assert ask(judge, [], parse_ratings, attempts=3) == SCORES
    assert [c["seed"] for c in judge.calls] == [0, 1]  # another seed for the retry
    judge = Scripted(["no idea", "still no", "nope", json.dumps(SCORES)])
    with pytest.raises(JudgeFailure) as failure:
        ask(judge, [], parse_ratings, attempts=3)
    assert failure.value.reply == "nope"
    transcripts = [{"id": "a", "system": "s", "lang": "zh", "turns": []}]
    ratings, failures = rate(transcripts, Scripted(["?", "?"]), attempts=2)
    assert ratings == [] and failures[0]["id"] == "a" and failures[0]["reply"] == "?"


class Echo:
    """Answers every chat with its number of messages; raises from call `fail_at` on."""

    def __init__(self, fail_at: int = 10**9):
        self.count, self.fail_at = 0, fail_at

    def complete(self, messages, **sampling):
        self.count += 1
        if self.count >= self.fail_at:
            raise ConnectionError("listener went away")
        return f"reply to {len(messages)} messages"


def test_simulation_resumes_after_an_interruption(tmp_path):
    situations = load_situations(sample_path("situations/zh_cantonese.jsonl"))[:6]
    out = tmp_path / "transcripts.jsonl"
    with pytest.raises(SimulationError, match="rerun"):
        simulate(situations, Echo(), Echo(fail_at=7), "ours", out, turns=3, workers=1)
    finished = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert finished == [s.id for s in situations[:2]]  # 3 listener calls per conversation
    with open(out, "a") as f:  # a kill in the middle of writing a third
        f.write('{"id": "yue-003", "system": "ours", "tu')
    records = simulate(situations, Echo(), Echo(), "ours", out, turns=3, workers=3)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(s.id for s in situations) and len(ids) == 6
    assert len(records) == 6
    assert [t["role"] for t in records[0]["turns"]] == ["speaker", "listener"] * 3
    assert simulate(situations, Echo(fail_at=1), Echo(fail_at=1), "ours", out) == records


class HashJudge:
    """A judge whose answer is a function of what it is shown (scores, or A/B/tie, from a hash
    of the conversations), so that any two runs agree. Counts its answers; at call `kill_at`
    it kills its own process instead of answering, as a power cut or `kill -9` would."""

    def __init__(self, kill_at: int = 0):
        self.calls = self.answers = 0
        self.kill_at = kill_at

    def complete(self, messages, **sampling):
        self.calls += 1
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        text = messages[-1]["content"]
        digest = hashlib.sha256(text.encode()).digest()
        if text.startswith("Conversation A"):
            answer = {m: ("A", "B", "tie")[digest[i] % 3] for i, m in enumerate(METRICS)}
        else:
            answer = {m: digest[i] % 11 for i, m in enumerate(METRICS)}
        self.answers += 1
        return json.dumps(answer)


def conversations(system: str, n: int) -> list[dict]:
    turns = lambda i: [
        {"role": "speaker", "text": f"Something sad happened, number {i}."},
        {"role": "listener", "text": f"{system} is sorry about {i}."},
    ]
    return [{"id": f"s{i}", "system": system, "lang": "zh", "turns": turns(i)} for i in range(n)]


def judge_all(command: str, judge, out=None):
    if command == "rate":
        return rate(conversations("ours", 3) + conversations("base", 3), judge, 1, out=out)
    return compare(conversations("ours", 4), conversations("base", 4), judge, 1, out=out)


@pytest.mark.parametrize("command, judgments", [("rate", 6), ("compare", 8)])
def test_judging_resumes_after_a_kill_without_repeating_or_losing_one(command, judgments, tmp_path):
    whole = HashJudge()
    expected = judge_all(command, whole)
    assert whole.calls == judgments and expected[1] == []
    out = tmp_path / f"{command}.jsonl"
    killed = multiprocessing.get_context("spawn").Process(
        target=judge_all, args=(command, HashJudge(kill_at=4), out)
    )
    killed.start()
    killed.join(120)
    assert killed.exitcode == -signal.SIGKILL
    assert len(out.read_text().splitlines()) == 3  # the answers before the kill, one line each
    with open(out, "a") as f:  # and a kill in the middle of writing a fourth
        f.write('{"id": "s3", "system": "ours", "sco')
    if command == "compare":  # the report leaves out the pair judged in one order only
        assert len(outcomes([json.loads(line) for line in out.read_text().splitlines()[:3]])) == 1
    rest = HashJudge()
    assert judge_all(command, rest, out) == expected
    assert 3 + rest.calls == judgments
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == judgments
    again = HashJudge()
    assert judge_all(command, again, out) == expected and again.calls == 0


def test_speaker_prompt_follows_the_situation():
    situation = Situation("x", "yue", "negative", "sad", "我隻貓走咗。")
    messages = speaker_messages(situation, [{"role": "speaker", "text": "好唔開心"}])
    assert "我隻貓走咗" in messages[0]["content"] and "廣東話" in messages[0]["content"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    with pytest.raises(ValueError, match="no speaker prompt for language 'french'"):
        speaker_messages(Situation("x", "french", "negative", "sad", "..."), [])


def test_report_tables_and_chart(tmp_path):
    outcomes = [
        {
            "id": str(i),
            "lang": "zh",
            "x": "ours",
            "y": "base",
            "outcomes": dict.fromkeys(METRICS, "win" if i < 9 else "lose"),
        }
        for i in range(10)
    ]
    table = ab_table(outcomes)
    assert "| zh | ours vs base | 10 | 90/10/0* |" in table  # sign test: p = 22/1024
    ratings = [
        {"id": str(i), "system": s, "lang": "zh", "scores": dict.fromkeys(METRICS, i + d)}
        for i in range(4)
        for s, d in (("ours", 2), ("base", 0))
    ]
    assert "| ours | 4 | 3.50" in ratings_table(ratings)
    assert "| empathy | 4 | +2.00 | inf | 0**" in paired_table(ratings, "ours", "base")
    ratings_chart(ratings, tmp_path / "ratings.png")
    assert (tmp_path / "ratings.png").read_bytes()[:4] == b"\x89PNG"


def test_the_api_key_stays_out_of_sight(monkeypatch):
    from lisendiff_jax.evaluation.client import Client, Endpoint

    monkeypatch.setenv("JUDGE_KEY", "sk-secret-123")
    endpoint = Endpoint("http://127.0.0.1:9/v1", "judge", api_key_env="JUDGE_KEY")
    client = Client(endpoint)
    assert client._client.api_key == "sk-secret-123"
    assert "sk-secret" not in repr(client) + repr(endpoint)


def test_report_on_a_file_that_is_not_ab_judgments_is_one_line(tmp_path, capsys):
    from lisendiff_jax.evaluation.__main__ import main

    wrong = tmp_path / "ab.jsonl"
    wrong.write_text(json.dumps({"id": "s1", "lang": "zh", "outcomes": {}}) + "\n")
    assert main(["report", "--outcomes", str(wrong), "--out-dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{wrong}: record 1 is not an A/B judgment" in err
