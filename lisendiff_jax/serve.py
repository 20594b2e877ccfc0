"""An OpenAI-compatible chat endpoint on localhost for a trained model (FastAPI on uvicorn).

    python -m lisendiff_jax.serve --workdir DIR [--host 127.0.0.1 --port 8000]
    python -m lisendiff_jax.serve --workdir EXPORT_FOLDER
    python -m lisendiff_jax.serve --backbone tiny            # the BaseLLM baseline
    python -m lisendiff_jax.serve --workdir DIR --max-batch 16 --batch-wait-ms 10

Routes: `POST /v1/chat/completions` and `GET /v1/models`, so any chat client (the `openai`
package, the evaluation in `lisendiff_jax.evaluation`, chat front-ends) can talk to the model.

How a chat maps to the model's context: the user and assistant messages, oldest first, become
the context turns (`inference.Request.context`); the last one must be the user's. A system
message is accepted and ignored: the model always answers with its own system prompt for the
reply language (`lang`, default the run's target language), the kind of prompt it was trained
with. Honoured: `temperature` (0 = greedy), `top_p`, `max_tokens` (or
`max_completion_tokens`), `seed` (an integer >= 0, default 0: the same request gets the same
reply), `stream`; extra fields `style` ("empathy" or "default"), `empathy` (the dial w: 0 the
default style, 1 the empathy style, in between or beyond), `guidance` (classifier-free
guidance on the context, 1 = none) and `lang` (e.g. "zh", "yue"; default: the run's target
language). `n` must be 1; other fields are ignored. `finish_reason` is always "stop" and no
token usage is reported. A blank message before the last is dropped (a client may send back
an empty reply); the last must not be blank.

Streaming (`"stream": true`): server-sent events in OpenAI's chunk format, one `data: {...}`
event per piece of text as the batch decodes it (the first carries the role), a last chunk
with the finish reason, then `data: [DONE]`. The pieces concatenate to the reply the same
request gets without streaming. A client that leaves mid-stream frees its row: the batch masks
it and decodes on for the others.

Bad requests (a body that is not UTF-8 JSON, fields of the wrong type or out of range, unknown
roles, no messages, a blank last message, an oversize body, another model's name, a prompt
that `max_tokens` leaves no room for, an unknown route or method, a malformed HTTP request)
get a 4xx answer with OpenAI's error object {"error": {"message", "type", "param", "code"}},
found before the request joins a batch; a failure inside the model answers 500 to the
requests of that batch (an error event to those streaming) and the server keeps serving. A
request refused before its body was read (an oversize body, say) has its connection closed
only once the client stops sending, or after `LINGER_S`, so that the client reads the answer
rather than a connection reset.

Batching: requests are read on uvicorn's event loop and handed to one worker thread, which
runs the model on up to `--max-batch` requests at once: those with the same sampling settings
that arrived while the model was busy, or within `--batch-wait-ms` of the oldest waiting
request; streaming and plain requests share batches. Every request draws its randomness from
its own seed (`inference.Request.seed`), so its reply is the same whether it ran alone or with
others (up to rounding where a device's kernels differ by batch size). Batches are padded to a
power of two (repeating a request, whose row is stopped at once) so that few batch shapes
compile.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Literal

import h11
import numpy as np
import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 60.0  # how long a client may take to send its body
LINGER_S = 5.0  # how long a refused client may go on sending before its connection is dropped


class RequestError(ValueError):
    """A request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers


# Request and response bodies: the fields of OpenAI's chat completion API this server reads
# and writes. Numbers are strict (no "8" for 8, no true for 1), as the API documents them.


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str  # OpenAI's list of {"type": "text", "text": ...} parts is joined

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            return "".join(p["text"] for p in content)
        # One error naming the field, not one per member of a str | list[...] union.
        raise PydanticCustomError("content_type", "must be a string or a list of text parts")


class ChatRequest(BaseModel):
    """A chat completion request; fields other clients send and this server does not use
    (`user`, `stream_options`, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1)
    temperature: StrictFloat | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: StrictFloat | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    n: StrictInt = Field(1, ge=1, le=1)
    stream: StrictBool = False
    seed: StrictInt | None = Field(None, ge=0)
    # This server's own: see `inference.Request`.
    style: StrictStr = "empathy"
    lang: StrictStr | None = None
    empathy: StrictFloat | None = Field(None, allow_inf_nan=False)
    guidance: StrictFloat = Field(1.0, allow_inf_nan=False)


class ReplyMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ReplyMessage
    finish_reason: Literal["stop"] = "stop"


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]


class ChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]  # {"role": ...} first, then {"content": ...}, {} with the finish
    finish_reason: Literal["stop"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lisendiff-jax"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error object."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _error(
    status: int, message: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status, headers)


def _param(loc: Sequence[str | int]) -> str | None:
    """A pydantic error location as OpenAI names the parameter: messages[3].content."""
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else f"{'.' if name else ''}{part}"
    return name or None


def parse_chat(chat: ChatRequest, model_name: str, default_lang: str) -> tuple[Any, Any]:
    """The (inference.Request, inference.Options) of a validated chat completion body;
    RequestError if it is not one this server can answer."""
    from lisendiff_jax.infer.inference import InputError, Options, Request

    if chat.model not in (None, model_name):
        raise RequestError(
            f"model {chat.model!r} not served here; this server serves {model_name!r}",
            status=404,
            param="model",
        )
    spoken = [(i, m) for i, m in enumerate(chat.messages) if m.role != "system"]
    if not spoken or spoken[-1][1].role != "user":
        raise RequestError("the last non-system message must be the user's", param="messages")
    last = spoken[-1][0]
    if not chat.messages[last].content.strip():  # a blank earlier turn is dropped, not this
        raise RequestError(f"messages[{last}].content is blank", param=f"messages[{last}]")
    options = Options(
        temperature=Options.temperature if chat.temperature is None else chat.temperature,
        top_p=Options.top_p if chat.top_p is None else chat.top_p,
        max_tokens=chat.max_completion_tokens or chat.max_tokens or Options.max_tokens,
    )
    try:
        request = Request(
            tuple(m.content for _, m in spoken),
            chat.style,
            chat.lang or default_lang,
            seed=chat.seed or 0,
            empathy=chat.empathy,
            guidance=chat.guidance,
        )
    except InputError as err:
        raise RequestError(str(err)) from None
    return request, options


@dataclasses.dataclass(eq=False)  # jobs are told apart by identity, not by their fields
class Job:
    request: Any  # inference.Request
    options: Any  # inference.Options
    arrived: float  # time.monotonic()
    future: Future  # of the inference.Reply, or the model's exception
    # Streaming: called with each token of the reply as the batch decodes it, on the
    # decoding thread; it must return at once and not raise.
    on_token: Callable[[int], None] | None = None
    cancelled: bool = False  # its client left: the batch stops decoding its row


class Batcher:
    """Runs a `Listener` on one worker thread, in batches of the waiting requests that share
    their options: the oldest waiting request's group, up to `max_batch` of them, once the
    group is full or the oldest has waited `wait_s`. `batches` counts the batches run."""

    def __init__(self, listener: Any, max_batch: int = 8, wait_s: float = 0.005):
        if max_batch < 1 or wait_s < 0:
            raise ValueError(f"need max_batch >= 1 and wait >= 0, got {max_batch}, {wait_s}")
        self.listener, self.max_batch, self.wait_s = listener, max_batch, wait_s
        self.batches = 0
        self._pending: list[Job] = []
        self._changed = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="batcher", daemon=True)
        self._worker.start()

    def submit(
        self, request: Any, options: Any, on_token: Callable[[int], None] | None = None
    ) -> Job:
        """The job answering `request`: its `future` holds the `inference.Reply`, or the
        model's exception if the batch failed; set `cancelled` to stop its row."""
        job = Job(request, options, time.monotonic(), Future(), on_token)
        with self._changed:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(job)
            self._changed.notify()
        return job

    def close(self) -> None:
        """Answers the requests already submitted, then stops the worker."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._worker.join()

    def _take(self) -> list[Job] | None:
        """The next batch, waiting for it; None once closed and nothing is left."""
        with self._changed:
            while True:
                # A job whose client left before its batch began is dropped.
                self._pending = [
                    j for j in self._pending if not (j.cancelled and j.future.cancel())
                ]
                if self._pending or self._closed:
                    break
                self._changed.wait()
            if not self._pending:
                return None
            oldest = self._pending[0]
            deadline = oldest.arrived + self.wait_s
            while True:
                group = [j for j in self._pending if j.options == oldest.options]
                left = deadline - time.monotonic()
                if len(group) >= self.max_batch or left <= 0 or self._closed:
                    break
                self._changed.wait(left)
            batch = group[: self.max_batch]
            self._pending = [j for j in self._pending if j not in batch]
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            requests = [job.request for job in batch]
            size = min(self.max_batch, 1 << (len(batch) - 1).bit_length())
            padded = requests + requests[-1:] * (size - len(requests))

            def sink(first: int, tokens: np.ndarray, live: np.ndarray, batch=batch) -> np.ndarray:
                # Every batch decodes with a sink, streaming or not, so that a streamed reply
                # and a plain one come from the same compiled program: equal bit for bit.
                stop = np.ones(len(tokens), bool)  # padding rows: nobody reads them
                for i, job in enumerate(batch):
                    if live[i] and not job.cancelled and job.on_token is not None:
                        job.on_token(int(tokens[i]))
                    stop[i] = job.cancelled
                return stop

            try:
                replies = self.listener.reply(padded, batch[0].options, size, sink=sink)
            except Exception as err:  # the callers answer 500; the worker goes on
                for job in batch:
                    job.future.set_exception(err)
            else:
                for job, reply in zip(batch, replies[: len(batch)], strict=True):
                    job.future.set_result(reply)
            self.batches += 1


class _LingeringTransport:
    """A connection's transport whose `close` lingers when the client's request was not read to
    its end (a refused body, a request h11 could not parse): it sends the answer's last bytes
    and a FIN, then reads and drops what the client still sends until it closes or
    `LINGER_S` passes. Closed at once, the socket would answer request bytes still unread, or
    arriving later, with a reset, and the client would see ECONNRESET or EPIPE instead of the
    error it was sent (seen for every 8 MiB body refused with 413). nginx's lingering close does
    the same; uvicorn closes at once."""

    def __init__(self, transport: asyncio.Transport, protocol: H11Protocol):
        self._transport, self._protocol = transport, protocol
        self.lingering = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        unread = self._protocol.conn.their_state in (h11.SEND_BODY, h11.ERROR)
        if self.is_closing() or not unread or not self._transport.can_write_eof():
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()  # after the buffered answer
        self._transport.resume_reading()  # flow control may have paused a long body
        asyncio.get_running_loop().call_later(LINGER_S, self._transport.close)


class _H11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request was refused unread with
    a linger (`_LingeringTransport`), and answering a request it cannot parse (a malformed
    request line or header, a negative Content-Length) in the API's JSON rather than plain
    text."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if not self.transport.lingering:  # what comes after the answer is dropped
            super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        data = json.dumps(error_body(400, msg)).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=data),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class ChatServer:
    """The FastAPI app around one `inference.Listener`, run by a `Batcher`, served by uvicorn
    on a socket bound at construction (`server_port`; port 0 picks a free one)."""

    def __init__(
        self,
        address: tuple[str, int],
        listener: Any,
        model_name: str,
        max_batch: int = 8,
        batch_wait_s: float = 0.005,
    ):
        self.listener, self.model_name = listener, model_name
        self.default_lang = listener.config.data.target_lang
        self.created = int(time.time())
        self.body_timeout_s = BODY_TIMEOUT_S
        self.batcher = Batcher(listener, max_batch, batch_wait_s)
        self.socket = socket.create_server(address)
        self.server_port = self.socket.getsockname()[1]
        self.app = self._app()
        config = uvicorn.Config(
            self.app,
            http=_H11Protocol,
            lifespan="off",
            log_level="warning",
            access_log=False,  # one line per request would drown the console under load
            backlog=2048,  # bursts of concurrent clients
            timeout_graceful_shutdown=5,
        )
        self._uvicorn = uvicorn.Server(config)
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        """Serves until `shutdown` (from another thread) or, on the main thread, Ctrl-C."""
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stops `serve_forever` and waits for it, if it runs."""
        self._uvicorn.should_exit = True
        if self._uvicorn.started:
            self._stopped.wait()

    def server_close(self) -> None:
        self.socket.close()
        self.batcher.close()

    def _app(self) -> FastAPI:
        app = FastAPI(title="LisenDiff-JAX", docs_url=None, redoc_url=None)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
            error = exc.errors()[0]  # OpenAI names one parameter
            loc = [part for part in error["loc"] if part != "body"]  # FastAPI's prefix
            param = _param(loc)
            if error["type"] == "json_invalid":
                return _error(400, f"the body is not valid UTF-8 JSON: {error['msg']}")
            if param is None:
                return _error(400, f"the body must be a JSON object: {error['msg']}")
            return _error(400, f"{param}: {error['msg']}", param)

        @app.exception_handler(RequestError)
        async def refused(request: HTTPRequest, exc: RequestError) -> JSONResponse:
            return _error(exc.status, str(exc), exc.param, exc.headers)

        @app.exception_handler(HTTPException)
        async def routing(request: HTTPRequest, exc: HTTPException) -> JSONResponse:
            where = f"{request.method} {request.url.path}"
            if exc.status_code == 404:
                return _error(404, f"no route {where}")
            if exc.status_code == 405:
                allowed = (exc.headers or {}).get("Allow", "")
                message = f"{request.url.path} answers {allowed}, not {request.method}"
                return _error(405, message, headers=exc.headers)
            return _error(exc.status_code, f"{where}: {exc.detail}", headers=exc.headers)

        @app.get("/v1/models")
        async def models() -> ModelList:
            return ModelList(data=[ModelCard(id=self.model_name, created=self.created)])

        @app.post("/v1/chat/completions", response_model=None)
        async def completions(http: HTTPRequest) -> ChatCompletion | StreamingResponse:
            # The body is read here rather than declared as a parameter: its size and read
            # time are bounded, and it is parsed as UTF-8 JSON whatever its Content-Type.
            try:
                chat = ChatRequest.model_validate_json(await self._body(http))
            except ValidationError as err:
                raise RequestValidationError(err.errors()) from None
            request, options = parse_chat(chat, self.model_name, self.default_lang)
            try:  # here, not in the batch: one request's fault must not fail the others
                self.listener.prepare(options)
                self.listener.check(request, options)
            except ValueError as err:
                raise RequestError(str(err)) from None
            if chat.stream:
                return self._stream(request, options)
            job = self.batcher.submit(request, options)
            try:
                reply = await asyncio.wrap_future(job.future)
            except asyncio.CancelledError:
                job.cancelled = True
                raise
            except Exception as err:
                return JSONResponse(self._model_error(err), 500)
            return ChatCompletion(
                id=f"chatcmpl-{uuid.uuid4().hex}",
                created=int(time.time()),
                model=self.model_name,
                choices=[Choice(message=ReplyMessage(content=reply.text))],
            )

        return app

    async def _body(self, http: HTTPRequest) -> bytes:
        close = {"Connection": "close"}  # an unread body would corrupt the next request
        length = http.headers.get("content-length")
        if length is None:
            raise RequestError("a Content-Length header is required", 411, headers=close)
        if int(length) > MAX_BODY_BYTES:  # h11 has checked that it is digits
            raise RequestError(f"body over {MAX_BODY_BYTES} bytes", 413, headers=close)
        try:
            return await asyncio.wait_for(http.body(), self.body_timeout_s)
        except TimeoutError:
            message = f"the body did not arrive within {self.body_timeout_s:g} s"
            raise RequestError(message, 408, headers=close) from None

    @staticmethod
    def _model_error(err: Exception) -> dict:
        """The error body answering a batch that failed, logged: answer, log, serve on."""
        traceback.print_exception(err, file=sys.stderr)
        return error_body(500, f"model error: {type(err).__name__}")

    def _stream(self, request: Any, options: Any) -> StreamingResponse:
        """The response streaming `request`'s reply; call on the event loop."""
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()  # None: the reply is done

        def put(token: int | None) -> None:  # from the decoding thread
            try:
                loop.call_soon_threadsafe(tokens.put_nowait, token)
            except RuntimeError:  # the loop is closed: the server is stopping, nobody reads
                pass

        job = self.batcher.submit(request, options, put)
        job.future.add_done_callback(lambda _: put(None))
        return _EventStream(self._events(job, tokens), job)

    async def _events(self, job: Job, tokens: asyncio.Queue[int | None]) -> AsyncIterator[str]:
        """The server-sent events of `job`'s reply, from its tokens as they come."""
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def event(delta: dict[str, str], finish: Literal["stop"] | None = None) -> str:
            choice = ChunkChoice(delta=delta, finish_reason=finish)
            chunk = ChatCompletionChunk(
                id=ident, created=created, model=self.model_name, choices=[choice]
            )
            return f"data: {chunk.model_dump_json()}\n\n"

        yield event({"role": "assistant", "content": ""})
        drawn, sent = [], ""
        while (token := await tokens.get()) is not None:
            drawn.append(token)
            # The whole text so far, as the reply will be written: a token may end inside a
            # multi-byte character, or decode differently once the next one comes, so only
            # text that extends what was sent goes out.
            text = self.listener.text(drawn)
            if len(text) > len(sent) and text.startswith(sent):
                yield event({"content": text[len(sent) :]})
                sent = text
        try:
            reply = job.future.result()
        except Exception as err:
            yield f"data: {json.dumps(self._model_error(err))}\n\n"
            return
        if len(reply.text) > len(sent) and reply.text.startswith(sent):
            yield event({"content": reply.text[len(sent) :]})
        yield event({}, "stop")
        yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events of a job, which is cancelled when the response ends however it
    ends: a client that leaves cancels the response while it waits for a token or while it
    sends one, and its row is then stopped."""

    def __init__(self, events: AsyncIterator[str], job: Job):
        super().__init__(events, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled = True


def make_server(
    listener: Any,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    max_batch: int = 8,
    batch_wait_ms: float = 5.0,
) -> ChatServer:
    """A bound, not yet serving `ChatServer`; port 0 picks a free port (`server.server_port`).
    Call `serve_forever()` (e.g. on a background thread), then `shutdown()` and
    `server_close()` to stop."""
    return ChatServer((host, port), listener, model_name, max_batch, batch_wait_ms / 1000)


def serve(
    model: Any,
    config: Any,
    tokenizer: Any,
    model_name: str,
    host: str,
    port: int,
    max_batch: int = 8,
    batch_wait_ms: float = 5.0,
) -> None:
    """Serves a loaded (model, config, tokenizer) until interrupted."""
    from lisendiff_jax.infer.inference import Listener

    listener = Listener(model, config, tokenizer)
    server = make_server(listener, model_name, host, port, max_batch, batch_wait_ms)
    print(f"serving {model_name!r} on http://{host}:{server.server_port}/v1", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lisendiff_jax.serve",
        description="Serve a trained model as an OpenAI-compatible chat endpoint.",
    )
    p.add_argument("--workdir", help="training workdir or exported folder")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest)")
    p.add_argument("--backbone", help="serve an untrained backbone (hub id or folder)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="backbone dtype")
    p.add_argument("--model-name", help="the served model's name (default: the folder's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests run at once (default 8)")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="how long a request may wait for others to share its batch (default 5)",
    )
    args = p.parse_args(argv)
    if bool(args.workdir) == bool(args.backbone):
        p.error("give exactly one of --workdir and --backbone")
    if args.max_batch < 1 or args.batch_wait_ms < 0:
        p.error("--max-batch must be >= 1 and --batch-wait-ms >= 0")
    from absl import logging

    from lisendiff_jax.errors import UserError
    from lisendiff_jax.infer.chat import load_model

    logging.set_verbosity(logging.ERROR)  # orbax logs at INFO and WARNING while restoring
    folder = Path(args.workdir) if args.workdir else None
    try:
        model, config, tokenizer = load_model(folder, args.backbone, args.step, args.dtype)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    name = args.model_name or (folder.absolute().name if folder else args.backbone)
    try:
        serve(
            model, config, tokenizer, name, args.host, args.port, args.max_batch, args.batch_wait_ms
        )
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
