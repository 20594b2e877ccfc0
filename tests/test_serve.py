"""The OpenAI-compatible server over loopback, with the real `openai` client."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import re
import socket
import threading
import time

import openai
import pytest

from lisendiff_jax.infer.inference import Listener, Options, Request
from lisendiff_jax.infer.restore import load_workdir
from lisendiff_jax.serve import make_server, parse_chat

MODEL = "tiny"
COMPLETIONS = "/v1/chat/completions"


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


def send(server, method: str, path: str, body: bytes | None, headers: dict) -> tuple:
    """(status, headers, JSON payload) of one request on its own connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
    conn.request(method, path, body, headers)
    response = conn.getresponse()
    answer = response.status, dict(response.getheaders()), json.loads(response.read())
    conn.close()
    return answer


def chat(**fields) -> bytes:
    return json.dumps({"messages": CHAT, **fields}).encode()


def with_last(content) -> bytes:
    return json.dumps({"messages": [*CHAT[:-1], {"role": "user", "content": content}]}).encode()


def bad(name, body, status=400, words="", method="POST", path=COMPLETIONS, headers=None):
    return pytest.param(method, path, body, headers or {}, status, words, id=name)


BAD = [
    bad("not JSON", b"{not json", words="not valid JSON"),
    bad("JSON, not an object", b"[]", words="JSON object"),
    bad("UTF-16", chat(max_tokens=4).decode().encode("utf-16"), words="not UTF-8"),
    bad("Latin-1", '{"messages": [{"role": "user", "content": "café"}]}'.encode("latin-1")),
    bad("nested past the stack", b"[" * 100_000 + b"]" * 100_000, words="not valid JSON"),
    bad("an integer of 5000 digits", b'{"seed": ' + b"9" * 5000 + b"}", words="not valid JSON"),
    bad("oversize body", b"{}", 413, "body over", headers={"Content-Length": str(2 << 20)}),
    bad("negative length", b"{}", words="negative", headers={"Content-Length": "-1"}),
    bad("no length", b"0\r\n\r\n", 411, headers={"Transfer-Encoding": "chunked"}),
    bad("no messages", b"{}", words="messages"),
    bad("empty messages", b'{"messages": []}', words="messages"),
    bad("messages not a list", b'{"messages": "hello"}', words="messages"),
    bad("a message not an object", b'{"messages": ["hello"]}', words="messages[0] must be"),
    bad("unknown role", json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode()),
    bad("no content", json.dumps({"messages": [{"role": "user"}]}).encode(), words="content"),
    bad("content a number", with_last(7), words="content"),
    bad("content null", with_last(None), words="content"),
    bad("image parts", with_last([{"type": "image_url", "image_url": {"url": "x"}}])),
    bad("blank content", with_last("   "), words="messages[3].content is blank"),
    bad("last from the assistant", chat()[:-2] + b', {"role": "assistant", "content": "x"}]}'),
    bad("only a system message", b'{"messages": [{"role": "system", "content": "x"}]}'),
    bad("temperature negative", chat(temperature=-0.5), words="temperature"),
    bad("temperature a string", chat(temperature="hot"), words="temperature"),
    bad("temperature NaN", chat()[:-1] + b', "temperature": NaN}', words="temperature"),
    bad("temperature Infinity", chat()[:-1] + b', "temperature": Infinity}'),
    bad("temperature huge", chat(temperature=1e308), words="temperature"),
    bad("temperature true", chat(temperature=True), words="temperature"),
    bad("top_p 0", chat(top_p=0), words="top_p"),
    bad("top_p over 1", chat(top_p=1.5), words="top_p"),
    bad("max_tokens 0", chat(max_tokens=0), words="max_tokens"),
    bad("max_tokens negative", chat(max_tokens=-3), words="max_tokens"),
    bad("max_tokens a float", chat(max_tokens=2.5), words="max_tokens"),
    bad("max_tokens a string", chat(max_tokens="8"), words="max_tokens"),
    bad("max_tokens true", chat(max_tokens=True), words="max_tokens"),
    bad("max_completion_tokens 0", chat(max_completion_tokens=0), words="max_completion"),
    bad("max_tokens past the context", chat(max_tokens=4090), words="leaves no room"),
    bad("max_tokens a million", chat(max_tokens=10**6), words="use max_tokens <="),
    bad("n 2", chat(n=2), words="n must be 1"),
    bad("n true", chat(n=True), words="n must be 1"),
    bad("stream", chat(stream=True), words="stream"),
    bad("another model", chat(model="gpt-9"), 404, "not served"),
    bad("unknown style", chat(style="angry"), words="style"),
    bad("style a list", chat(style=["empathy"]), words="style"),
    bad("unknown lang", chat(lang="fr"), words="language 'fr'"),
    bad("lang a list", chat(lang=["zh"]), words="lang"),
    bad("seed a string", chat(seed="five"), words="seed"),
    bad("seed negative", chat(seed=-1), words="seed"),
    bad("seed true", chat(seed=True), words="seed"),
    bad("seed a float", chat(seed=1.5), words="seed"),
    bad("unknown path", chat(), 404, "no route", path="/v1/completions"),
    bad("unknown GET path", None, 404, "no route", "GET", "/v1/engines"),
    bad("GET completions", None, 405, "POST", "GET"),
    bad("PUT completions", chat(), 405, "POST", "PUT"),
    bad("DELETE models", None, 405, "GET", "DELETE", "/v1/models"),
    bad("POST models", chat(), 405, "GET", path="/v1/models"),
]


@pytest.mark.parametrize("method, path, body, headers, status, words", BAD)
def test_bad_requests_get_openai_errors(server, method, path, body, headers, status, words):
    code, answer_headers, payload = send(server, method, path, body, headers)
    assert code == status and 400 <= code < 500
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and words in error["message"], error
    assert error["type"] == "invalid_request_error"
    if code == 405:
        assert answer_headers["Allow"] in ("GET", "POST")


def test_the_server_serves_on_after_every_bad_request_at_once(server):
    before = server.batcher.batches
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda case: send(server, *case.values[:4])[0], BAD))
    assert all(400 <= code < 500 for code in codes)
    assert server.batcher.batches == before  # each was refused before reaching the model
    code, _, payload = send(server, "POST", COMPLETIONS, chat(max_tokens=4), {})
    assert code == 200 and isinstance(payload["choices"][0]["message"]["content"], str)


def test_the_largest_max_tokens_advised_is_accepted(server):
    code, _, payload = send(server, "POST", COMPLETIONS, chat(max_tokens=4090), {})
    message = payload["error"]["message"]
    prompt, largest = map(int, re.search(r"the (\d+)-token prompt.*<= (\d+)$", message).groups())
    assert message == (
        f"max_tokens 4090 leaves no room for the {prompt}-token prompt in this model's "
        f"4096-token context; use max_tokens <= {largest}"
    )
    request, options = parse_chat(json.loads(chat(max_tokens=largest)), MODEL, "zh")
    assert largest + prompt == 4096 and request.lang == server.default_lang
    server.listener.check(request, options)  # the advice holds (decoding that long is slow)


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
