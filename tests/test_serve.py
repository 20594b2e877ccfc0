"""The OpenAI-compatible server over loopback, with the real `openai` client."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import threading
import time

import openai
import pytest

from lisendiff_jax.infer.inference import Listener, Options, Request
from lisendiff_jax.infer.restore import load_workdir
from lisendiff_jax.serve import make_server

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_workdir):
    model, config, tokenizer = load_workdir(tiny_workdir, dtype="float32")
    server = make_server(Listener(model, config, tokenizer), MODEL)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def client(server, **kwargs) -> openai.OpenAI:
    url = f"http://127.0.0.1:{server.server_port}/v1"
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, **kwargs)


def post(server, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body, headers or {})
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


CHAT = [
    {"role": "system", "content": "ignored"},
    {"role": "user", "content": "I lost my job today."},
    {"role": "assistant", "content": "Oh no, what happened?"},
    {"role": "user", "content": "They closed my office."},
]


def test_models_and_a_seeded_completion(server):
    c = client(server)
    assert [m.id for m in c.models.list()] == [MODEL]
    ask = lambda seed: c.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        temperature=0.9,
        top_p=0.95,
        max_tokens=8,
        seed=seed,
        extra_body={"style": "default", "lang": "yue"},
    )
    first = ask(3)
    assert first.choices[0].message.role == "assistant"
    assert isinstance(first.choices[0].message.content, str)
    assert ask(3).choices[0].message.content == first.choices[0].message.content
    # The reply sample.py --seed 3 gives for the same context and settings.
    request = Request(tuple(m["content"] for m in CHAT[1:]), "default", "yue")
    options = Options(seed=3, temperature=0.9, top_p=0.95, max_tokens=8)
    assert first.choices[0].message.content == server.listener.reply([request], options)[0].text


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[]", 400, "JSON object"),
        (b"{}", 400, "messages"),
        (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "role"),
        (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(), 400, "last"),
        (json.dumps({"messages": CHAT, "temperature": 7}).encode(), 400, "temperature"),
        (json.dumps({"messages": CHAT, "style": "angry"}).encode(), 400, "style"),
        (json.dumps({"messages": CHAT, "max_tokens": 10**6}).encode(), 400, "max tokens"),
        (json.dumps({"messages": CHAT, "model": "gpt-9"}).encode(), 404, "not served"),
    ],
    ids=lambda value: "" if isinstance(value, bytes) else str(value),
)
def test_bad_requests_get_openai_errors(server, body, status, words):
    code, payload = post(server, body)
    assert code == status
    assert words in payload["error"]["message"]
    assert payload["error"]["type"] == "invalid_request_error"


def test_an_oversize_body_is_refused_unread(server):
    # The header alone decides: the server answers before reading (or receiving) the body.
    code, payload = post(server, b"{}", {"Content-Length": str(2 << 20)})
    assert code == 413 and "body over" in payload["error"]["message"]


def test_a_body_cut_short_does_not_hold_the_server(server, monkeypatch):
    monkeypatch.setattr(server.RequestHandlerClass, "timeout", 0.5)
    stalled = socket.create_connection(("127.0.0.1", server.server_port))
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
    assert client(server).models.list().data  # other clients are served meanwhile
    stalled.settimeout(10)
    assert stalled.recv(1) == b""  # and the stalled one is dropped after the timeout
    stalled.close()


def test_a_model_error_answers_500_and_the_server_lives_on(server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.listener, "reply", broken)
    with pytest.raises(openai.InternalServerError):
        client(server).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    monkeypatch.undo()
    assert client(server).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)


def test_concurrent_requests_are_batched_and_answered_as_alone(server):
    c = client(server, timeout=120)
    ask = lambda i: c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Tell me about day {i}."}],
        temperature=1.0,
        top_p=1.0,
        max_tokens=6,
        seed=i // 2,  # pairs of requests share a seed, not their words
    )
    alone = [ask(i).choices[0].message.content for i in range(32)]  # one batch each
    before = server.batcher.batches
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = [r.choices[0].message.content for r in pool.map(ask, range(32))]
    assert server.batcher.batches - before < 32
    assert together == alone
    assert len(set(alone)) > 12  # the replies differ: equal lists say something


def test_an_error_answers_500_to_its_batch_only(server, monkeypatch):
    reply = server.listener.reply

    def broken_for_five_tokens(requests, options, batch_size):
        if options.max_tokens == 5:
            raise RuntimeError("boom")
        return reply(requests, options, batch_size)

    monkeypatch.setattr(server.listener, "reply", broken_for_five_tokens)
    ask = lambda i: post(
        server, json.dumps({"messages": CHAT, "max_tokens": 4 + i % 2, "seed": i}).encode()
    )
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert [code for code, _ in answers] == [200, 500] * 8
    assert all(p["error"]["type"] == "server_error" for code, p in answers if code == 500)


def test_concurrent_requests_all_answered(server):
    n = 200
    c = client(server, timeout=120)
    ask = lambda i: c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Hello {i}"}], max_tokens=4, seed=i
    )
    ask(0)  # compile one request's shape outside the timed part
    for wave in ("first", "second"):  # the first also compiles the batch shapes of the load
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:  # all n in flight at once
            replies = list(pool.map(ask, range(n)))
        seconds = time.perf_counter() - start
        assert len({r.id for r in replies}) == n
        print(f"{wave} wave: {n} concurrent requests in {seconds:.1f}s: {n / seconds:.1f}/s")


def test_command_line_errors_are_one_line(capsys):
    from lisendiff_jax.serve import main

    assert main(["--workdir", "/no/such/workdir"]) == 1
    assert "no such workdir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])
