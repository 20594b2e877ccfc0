"""The whole evaluation loop over loopback: our server (the tiny model) plays the speaker and
two listener systems, the real `openai` client carries every request, and the judge is our
server too - once with the tiny model, whose replies cannot be parsed and are reported, and
once with a model that always answers the same JSON, so that ratings, A/B outcomes, the table
and the chart come out."""

from __future__ import annotations

import json
import threading
import types

import pytest

from lisendiff_jax.data.bundled import load_situations, sample_path
from lisendiff_jax.evaluation.client import Client, Endpoint
from lisendiff_jax.evaluation.judge import METRICS, compare, rate
from lisendiff_jax.evaluation.report import ab_table, paired_table, ratings_chart, ratings_table
from lisendiff_jax.evaluation.simulate import simulate
from lisendiff_jax.infer.inference import Listener, Reply
from lisendiff_jax.infer.restore import load_workdir
from lisendiff_jax.serve import make_server


class FixedJudge:
    """A model that answers with the JSON a judge prompt asks for: 5 on every metric for a
    rating, "A" on every metric for a comparison (a judge that always prefers the first
    conversation, which judging both orders turns into ties)."""

    config = types.SimpleNamespace(data=types.SimpleNamespace(target_lang="zh"))

    def prepare(self, options):
        return None

    def check(self, request, options):
        return None

    def reply(self, requests, options, batch_size=16, sink=None):  # no tokens to stream
        answer = lambda r: "A" if r.context[-1].startswith("Conversation A") else 5
        return [Reply(json.dumps(dict.fromkeys(METRICS, answer(r))), None) for r in requests]


@pytest.fixture(scope="module")
def urls(tiny_workdir):
    model, config, tokenizer = load_workdir(tiny_workdir, dtype="float32")
    servers = [
        make_server(Listener(model, config, tokenizer), "tiny"),
        make_server(FixedJudge(), "fixed-judge"),
    ]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield [f"http://127.0.0.1:{s.server_port}/v1" for s in servers]
    for server in servers:
        server.shutdown()
        server.server_close()


def test_simulate_judge_and_report_over_loopback(urls, tmp_path):
    tiny, fixed = urls
    situations = load_situations(sample_path("situations/zh_mandarin.jsonl"))[:3]
    speaker = Client(Endpoint(tiny, "tiny", extra_body={"lang": "zh", "style": "default"}))
    short = {"max_tokens": 8, "seed": 1}
    transcripts = {}
    for style in ("empathy", "default"):
        listener = Client(Endpoint(tiny, "tiny", extra_body={"lang": "zh", "style": style}))
        transcripts[style] = simulate(
            situations, speaker, listener, style, tmp_path / "transcripts.jsonl", 3, 3, short, short
        )
        assert [t["id"] for t in sorted(transcripts[style], key=lambda t: t["id"])] == [
            s.id for s in situations
        ]
        assert all(len(t["turns"]) == 6 for t in transcripts[style])

    ratings, failures = rate(
        transcripts["empathy"], Client(Endpoint(tiny, "tiny")), attempts=1, sampling=short
    )
    assert ratings == [] and len(failures) == 3  # the tiny model writes no judge JSON
    assert all("unparseable" in f["error"] for f in failures)

    judge = Client(Endpoint(fixed, "fixed-judge"))
    ratings = []
    for style in transcripts:
        judged, failures = rate(transcripts[style], judge)
        assert failures == []
        ratings += judged
    outcomes, failures = compare(transcripts["empathy"], transcripts["default"], judge)
    assert failures == [] and len(outcomes) == 3
    assert all(set(o["outcomes"].values()) == {"tie"} for o in outcomes)  # position bias
    assert "| zh | empathy vs default | 3 | 0/0/100 |" in ab_table(outcomes)
    assert "| empathy | 3 | 5.00 [5.00, 5.00] |" in ratings_table(ratings)
    assert "| empathy | 3 | +0.00 | 0.00 | 1 |" in paired_table(ratings, "empathy", "default")
    ratings_chart(ratings, tmp_path / "ratings.png")
    assert (tmp_path / "ratings.png").stat().st_size > 0


def test_command_line_runs_the_loop(urls, tmp_path):
    from lisendiff_jax.evaluation.__main__ import main

    tiny, fixed = urls
    situations = tmp_path / "situations.jsonl"
    lines = sample_path("situations/zh_cantonese.jsonl").read_text(encoding="utf-8")
    situations.write_text("".join(lines.splitlines(keepends=True)[:2]), encoding="utf-8")
    transcripts = tmp_path / "transcripts.jsonl"
    for system in ("empathy", "default"):
        roles = []
        for role in ("speaker", "listener"):
            extra = json.dumps({"lang": "yue", "style": system})
            roles += [f"--{role}-url", tiny, f"--{role}-model", "tiny", f"--{role}-extra", extra]
        argv = ["simulate", *roles, "--system", system, "--situations", str(situations)]
        assert main([*argv, "--turns", "1", "--out", str(transcripts)]) == 0
    judge = ["--judge-url", fixed, "--judge-model", "fixed-judge"]
    files = ["--transcripts", str(transcripts)]
    assert main(["rate", *judge, *files, "--out", str(tmp_path / "ratings.jsonl")]) == 0
    ratings = (tmp_path / "ratings.jsonl").read_text().splitlines()
    assert len(ratings) == 4  # without --system: every system's conversations
    ab = ["compare", *judge, *files, "--x", "empathy", "--y", "default"]
    assert main([*ab, "--out", str(tmp_path / "ab.jsonl")]) == 0
    report = ["report", "--ratings", str(tmp_path / "ratings.jsonl"), "--x", "empathy"]
    report += ["--y", "default", "--outcomes", str(tmp_path / "ab.jsonl")]
    assert main([*report, "--out-dir", str(tmp_path / "report")]) == 0
    names = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert names == ["ab_table.md", "paired.md", "ratings.md", "ratings.png"]
    assert (
        "| yue | empathy vs default | 2 | 0/0/100 |"
        in (tmp_path / "report/ab_table.md").read_text()
    )
    assert main(["rate", *judge, "--transcripts", "missing.jsonl", "--out", "x.jsonl"]) == 1
