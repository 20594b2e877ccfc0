"""The OpenAI-compatible server over loopback, with the real `openai` client."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import re
import socket
import threading
import time

import httpx
import openai
import pytest

from lisendiff_jax import serve
from lisendiff_jax.infer.inference import Listener, Options, Request
from lisendiff_jax.infer.restore import load_workdir
from lisendiff_jax.serve import ChatRequest, make_server, parse_chat

MODEL = "tiny"
TIMEOUT = 300  # seconds: a new batch shape compiles first, slowly on a busy CPU
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
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=TIMEOUT)
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
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=TIMEOUT)
    conn.request(method, path, body, headers)
    response = conn.getresponse()
    answer = response.status, response.headers, json.loads(response.read())
    conn.close()
    return answer


def until_closed(conn: socket.socket) -> bytes:
    """What the server sends on `conn` until it closes its side (10 s at most)."""
    conn.settimeout(10)
    answer = b""
    while chunk := conn.recv(4096):
        answer += chunk
    return answer


def chat(**fields) -> bytes:
    return json.dumps({"messages": CHAT, **fields}).encode()


def with_last(content) -> bytes:
    return json.dumps({"messages": [*CHAT[:-1], {"role": "user", "content": content}]}).encode()


def bad(name, body, status=400, words="", method="POST", path=COMPLETIONS, headers=None):
    return pytest.param(method, path, body, headers or {}, status, words, id=name)


BAD = [
    bad("not JSON", b"{not json", words="not valid UTF-8 JSON"),
    bad("JSON, not an object", b"[]", words="JSON object"),
    bad("UTF-16", chat(max_tokens=4).decode().encode("utf-16"), words="not valid UTF-8 JSON"),
    bad("Latin-1", '{"messages": [{"role": "user", "content": "café"}]}'.encode("latin-1")),
    bad("nested past the stack", b"[" * 100_000 + b"]" * 100_000, words="not valid UTF-8"),
    bad("an integer of 5000 digits", b'{"seed": ' + b"9" * 5000 + b"}", words="not valid UTF-8"),
    bad("empty body", b"", words="not valid UTF-8 JSON"),
    bad("oversize body", b"{}", 413, "body over", headers={"Content-Length": str(2 << 20)}),
    bad("negative length", b"{}", words="Invalid HTTP", headers={"Content-Length": "-1"}),
    bad("no length", b"0\r\n\r\n", 411, headers={"Transfer-Encoding": "chunked"}),
    bad("no messages", b"{}", words="messages"),
    bad("empty messages", b'{"messages": []}', words="messages"),
    bad("messages not a list", b'{"messages": "hello"}', words="messages"),
    bad("a message not an object", b'{"messages": ["hello"]}', words="messages[0]: "),
    bad("unknown role", json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode()),
    bad("no content", json.dumps({"messages": [{"role": "user"}]}).encode(), words="content"),
    bad("content a number", with_last(7), words="messages[3].content: must be a string"),
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
    bad("n 2", chat(n=2), words="n: "),
    bad("n true", chat(n=True), words="n: "),
    bad("stream a string", chat(stream="yes"), words="stream"),
    bad("model a number", chat(model=7), words="model"),
    bad("another model", chat(model="gpt-9"), 404, "not served"),
    bad("unknown style", chat(style="angry"), words="style"),
    bad("style a list", chat(style=["empathy"]), words="style"),
    bad("lang without a prompt", chat(lang="fr"), words="no system prompt"),
    bad("lang no language", chat(lang="not a language!"), words="lang"),
    bad("lang a list", chat(lang=["zh"]), words="lang"),
    bad("empathy a string", chat(empathy="high"), words="empathy"),
    bad("empathy NaN", chat()[:-1] + b', "empathy": NaN}', words="empathy"),
    bad("guidance null", chat(guidance=None), words="guidance"),
    bad("guidance without a null context", chat(guidance=2.0), words="context_dropout"),
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
        assert words in answer_headers["Allow"]


def test_the_server_serves_on_after_every_bad_request_at_once(server):
    before = server.batcher.batches
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda case: send(server, *case.values[:4])[0], BAD))
    assert all(400 <= code < 500 for code in codes)
    assert server.batcher.batches == before  # each was refused before reaching the model
    code, _, payload = send(server, "POST", COMPLETIONS, chat(max_tokens=4), {})
    assert code == 200 and isinstance(payload["choices"][0]["message"]["content"], str)


def test_a_body_over_the_limit_gets_its_413_while_it_is_still_being_sent(server):
    # The client writes all 8 MiB before it reads: closed at once, the server's socket would
    # answer the unread rest with a reset and the client would never see the 413.
    code, _, payload = send(server, "POST", COMPLETIONS, b" " * (8 << 20), {})
    assert code == 413 and payload["error"]["message"] == "body over 1048576 bytes"


def test_a_refused_client_that_sends_on_is_dropped_after_the_linger(server, monkeypatch):
    monkeypatch.setattr(serve, "LINGER_S", 0.5)
    refused = socket.create_connection(("127.0.0.1", server.server_port))
    refused.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n")
    assert until_closed(refused).startswith(b"HTTP/1.1 400 ")  # the answer, then a FIN
    start = time.monotonic()
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        while time.monotonic() - start < 10:  # read and dropped until the linger is over
            refused.sendall(b"x" * 4096)
            time.sleep(0.01)
    assert 0.3 < time.monotonic() - start < 5
    refused.close()


def test_the_largest_max_tokens_advised_is_accepted(server):
    code, _, payload = send(server, "POST", COMPLETIONS, chat(max_tokens=4090), {})
    message = payload["error"]["message"]
    prompt, largest = map(int, re.search(r"the (\d+)-token prompt.*<= (\d+)$", message).groups())
    assert message == (
        f"max_tokens 4090 leaves no room for the {prompt}-token prompt in this model's "
        f"4096-token context; use max_tokens <= {largest}"
    )
    body = ChatRequest.model_validate_json(chat(max_tokens=largest))
    request, options = parse_chat(body, MODEL, "zh")
    assert largest + prompt == 4096 and request.lang == server.default_lang
    server.listener.check(request, options)  # the advice holds (decoding that long is slow)


def test_a_body_cut_short_does_not_hold_the_server(server, monkeypatch):
    monkeypatch.setattr(server, "body_timeout_s", 0.5)
    stalled = socket.create_connection(("127.0.0.1", server.server_port))
    stalled.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
    )
    assert client(server).models.list().data  # other clients are served meanwhile
    answer = until_closed(stalled)  # and the stalled one is answered and dropped
    stalled.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert "did not arrive" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["message"]


def test_a_model_error_answers_500_and_the_server_lives_on(server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.listener, "reply", broken)
    BROKEN = dict(model=MODEL, messages=CHAT, max_tokens=4)
    with pytest.raises(openai.InternalServerError):
        client(server).chat.completions.create(**BROKEN)
    with pytest.raises(openai.APIError, match="model error: RuntimeError"):  # an error event
        list(client(server).chat.completions.create(**BROKEN, stream=True))
    monkeypatch.undo()
    assert client(server).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)


def test_concurrent_requests_are_batched_and_answered_as_alone(server):
    c = client(server, timeout=TIMEOUT)
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

    def broken_for_five_tokens(requests, options, batch_size, **kwargs):
        if options.max_tokens == 5:
            raise RuntimeError("boom")
        return reply(requests, options, batch_size, **kwargs)

    monkeypatch.setattr(server.listener, "reply", broken_for_five_tokens)
    ask = lambda i: post(
        server, json.dumps({"messages": CHAT, "max_tokens": 4 + i % 2, "seed": i}).encode()
    )
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert [code for code, _ in answers] == [200, 500] * 8
    assert all(p["error"]["type"] == "server_error" for code, p in answers if code == 500)


def streamed(c: openai.OpenAI, **fields) -> list[str]:
    """The content pieces of a streamed completion, as the `openai` client reads them."""
    chunks = list(c.chat.completions.create(model=MODEL, stream=True, **fields))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len({chunk.id for chunk in chunks}) == 1
    return [chunk.choices[0].delta.content for chunk in chunks if chunk.choices[0].delta.content]


# The settings of test_concurrent_requests_are_batched_and_answered_as_alone: no new compile.
SETTINGS = dict(temperature=1.0, top_p=1.0, max_tokens=6)


def test_streamed_chunks_concatenate_to_the_plain_reply(server):
    c = client(server, timeout=TIMEOUT)
    for seed in range(4):
        fields = dict(messages=CHAT, seed=seed, **SETTINGS)
        plain = c.chat.completions.create(model=MODEL, **fields).choices[0].message.content
        pieces = streamed(c, **fields)
        assert "".join(pieces) == plain
        assert len(pieces) > 1  # sent as it was decoded, not in one piece at the end
    url = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
    body = {"messages": CHAT, "stream": True, **SETTINGS}
    with httpx.stream("POST", url, json=body, timeout=TIMEOUT) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        events = "".join(raw.iter_text()).split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])


def test_a_client_that_leaves_mid_stream_frees_its_row(server, monkeypatch):
    leaving = ("I am off.",)
    jobs, rows, steps = [], [], []  # steps: (live, stop) of each decoding step of its batch
    submit, reply = server.batcher.submit, server.listener.reply
    started = threading.Event()

    def record(*args):
        jobs.append(submit(*args))
        return jobs[-1]

    def held(requests, options, size, sink):
        contexts = [r.context for r in requests]
        if leaving not in contexts:
            return reply(requests, options, size, sink=sink)
        rows.append(contexts.index(leaving))
        job = next(j for j in jobs if j.request.context == leaving)

        def watched(first, tokens, live):
            if len(steps) == 1:  # hold the batch until the leaving client has gone
                started.set()
                deadline = time.monotonic() + 30  # the client closes at once
                while not job.cancelled and time.monotonic() < deadline:
                    time.sleep(0.01)
            stop = sink(first, tokens, live)
            steps.append((live.copy(), stop.copy()))
            return stop

        return reply(requests, options, size, sink=watched)

    monkeypatch.setattr(server.batcher, "submit", record)
    monkeypatch.setattr(server.listener, "reply", held)
    monkeypatch.setattr(server.batcher, "wait_s", 1.0)  # the three requests share a batch
    c = client(server, timeout=TIMEOUT)
    ask = lambda words: dict(messages=[{"role": "user", "content": words}], seed=5, **SETTINGS)

    def leave():
        with c.chat.completions.create(model=MODEL, stream=True, **ask(leaving[0])) as stream:
            next(iter(stream))  # the role chunk
            started.wait(TIMEOUT)  # the batch has decoded a token
        # leaving the block closes the connection mid-stream

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        left = pool.submit(leave)
        staying = [pool.submit(streamed, c, **ask(w)) for w in ("I stay.", "Me too.")]
        left.result()
        replies = ["".join(f.result()) for f in staying]
    monkeypatch.undo()
    assert len(rows) == 1 and len(steps) >= 3 and len(steps[0][0]) == 4  # one batch of 3 + 1
    (live0, stop0), (live1, stop1), (live2, _) = steps[:3]
    row = rows[0]
    assert live1[row] and not stop0[row]  # it was decoding when its client left
    assert stop1[row] and not live2[row]  # and its row stopped at once
    for words, streamed_reply in zip(("I stay.", "Me too."), replies, strict=True):
        alone = c.chat.completions.create(model=MODEL, **ask(words)).choices[0].message.content
        assert streamed_reply == alone  # the others were not disturbed


def test_concurrent_requests_all_answered(server):
    n = 200
    c = client(server, timeout=TIMEOUT)
    ask = lambda i: dict(messages=[{"role": "user", "content": f"Hello {i // 2}"}], seed=i // 2)

    def answer(i: int) -> str:  # odd requests stream, each the twin of the even one before
        if i % 2:
            return "".join(streamed(c, **ask(i), **SETTINGS))
        return (
            c.chat.completions.create(model=MODEL, **ask(i), **SETTINGS).choices[0].message.content
        )

    for size in (1, 2, 4, 8):  # compile the batch shapes outside the timed part
        with concurrent.futures.ThreadPoolExecutor(size) as pool:
            list(pool.map(answer, range(size)))
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:  # all n in flight at once
        replies = list(pool.map(answer, range(n)))
    seconds = time.perf_counter() - start
    assert replies[::2] == replies[1::2]  # each streamed reply is its twin's
    assert len(set(replies)) > n // 4
    print(f"{n} concurrent requests, half streaming, in {seconds:.1f}s: {n / seconds:.1f}/s")


def test_command_line_errors_are_one_line(capsys):
    from lisendiff_jax.serve import main

    assert main(["--workdir", "/no/such/workdir"]) == 1
    assert "no such workdir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])
