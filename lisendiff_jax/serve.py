"""An OpenAI-compatible chat endpoint on localhost for a trained model.

    python -m lisendiff_jax.serve --workdir DIR [--host 127.0.0.1 --port 8000]
    python -m lisendiff_jax.serve --workdir EXPORT_FOLDER
    python -m lisendiff_jax.serve --backbone tiny            # the BaseLLM baseline
    python -m lisendiff_jax.serve --workdir DIR --max-batch 16 --batch-wait-ms 10

Routes: `POST /v1/chat/completions` and `GET /v1/models`, so any chat client (the `openai`
package, the evaluation in `lisendiff_jax.evaluation`) can talk to the model.

How a chat maps to the model's context: the user and assistant messages, oldest first, become
the context turns (`inference.Request.context`); the last one must be the user's. A system
message is accepted and ignored: the model always answers with its own system prompt for the
reply language (`lang`, default the run's target language), the kind of prompt it was trained
with. Honoured: `temperature` (0 = greedy), `top_p`,
`max_tokens` (or `max_completion_tokens`), `seed` (an integer >= 0, default 0: the same
request gets the same reply); extra fields `style` ("empathy" or "default") and `lang` (e.g.
"zh", "yue"; default: the run's target language). `n` must be 1 and `stream` false.
`finish_reason` is always "stop" and no token usage is reported. A blank message before the
last is dropped (a client may send back an empty reply); the last must not be blank.

Bad requests (a body that is not UTF-8 JSON, unknown roles, no messages, a blank last message,
an oversize body, values out of range, another model's name, a prompt that `max_tokens` leaves
no room for, an unknown route or method) get a 4xx answer with an OpenAI-style error object,
found before the request joins a batch; a failure inside the model answers 500 to the requests
of that batch and the server keeps serving.

Batching: requests are read on threads and handed to one worker thread, which runs the model
on up to `--max-batch` requests at once: those with the same sampling settings that arrived
while the model was busy, or within `--batch-wait-ms` of the oldest waiting request. Every
request draws its randomness from its own seed (`inference.Request.seed`), so its reply is the
same whether it ran alone or with others (up to rounding where a device's kernels differ by
batch size). Batches are padded to a power of two (repeating a
request, whose extra replies are dropped) so that few batch shapes compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Sequence
from concurrent.futures import Future
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MAX_BODY_BYTES = 1 << 20
ROLES = ("system", "user", "assistant")
ROUTES = {"/v1/chat/completions": "POST", "/v1/models": "GET"}  # path: its one method


class RequestError(ValueError):
    """A request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


def _text(content: Any, index: int) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise RequestError(
        "content must be a string or a list of text parts", param=f"messages[{index}].content"
    )


def _number(
    body: dict, name: str, default: float, low: float, high: float, open_low: bool = False
) -> float:
    value = body.get(name)
    if value is None:
        return default
    # NaN fails both comparisons; JSON's Infinity fails the upper one.
    inside = (
        isinstance(value, int | float) and low <= value <= high and not (open_low and value == low)
    )
    if isinstance(value, bool) or not inside:
        interval = f"{'(' if open_low else '['}{low}, {high}]"
        raise RequestError(f"{name} must be a number in {interval}", param=name)
    return value


def _integer(body: dict, name: str, low: int) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
        raise RequestError(f"{name} must be an integer >= {low}", param=name)
    return value


def parse_chat(body: Any, model_name: str, default_lang: str) -> tuple[Any, Any]:
    """The (inference.Request, inference.Options) of a chat completion body; RequestError if
    the body is not one this server can answer."""
    from lisendiff_jax.infer.inference import InputError, Options, Request

    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise RequestError(
            f"model {body.get('model')!r} not served here; this server serves {model_name!r}",
            status=404,
            param="model",
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    turns, roles, last = [], [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        if message.get("role") not in ROLES:
            raise RequestError(
                f"messages[{i}].role must be one of {', '.join(ROLES)}", param=f"messages[{i}]"
            )
        text = _text(message.get("content"), i)
        if message["role"] != "system":
            turns.append(text)
            roles.append(message["role"])
            last = i
    if not roles or roles[-1] != "user":
        raise RequestError("the last non-system message must be the user's", param="messages")
    if not turns[-1].strip():  # a blank earlier turn is dropped, but this one is the question
        raise RequestError(f"messages[{last}].content is blank", param=f"messages[{last}]")
    if body.get("stream") not in (None, False):
        raise RequestError("stream is not supported", param="stream")
    if isinstance(body.get("n"), bool) or body.get("n", 1) != 1:
        raise RequestError("n must be 1", param="n")
    tokens_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _integer(body, tokens_field, 1)
    seed = _integer(body, "seed", 0)
    for name in ("style", "lang"):
        if not isinstance(body.get(name, ""), str):
            raise RequestError(f"{name} must be a string", param=name)
    options = Options(
        temperature=_number(body, "temperature", Options.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", Options.top_p, 0.0, 1.0, open_low=True),
        max_tokens=max_tokens or Options.max_tokens,
    )
    try:
        request = Request(
            tuple(turns),
            body.get("style", "empathy"),
            body.get("lang", default_lang),
            seed=seed or 0,
        )
    except InputError as err:
        raise RequestError(str(err)) from None
    return request, options


@dataclasses.dataclass(eq=False)  # jobs are told apart by identity, not by their fields
class _Job:
    request: Any  # inference.Request
    options: Any  # inference.Options
    arrived: float  # time.monotonic()
    future: Future


class Batcher:
    """Runs a `Listener` on one worker thread, in batches of the waiting requests that share
    their options: the oldest waiting request's group, up to `max_batch` of them, once the
    group is full or the oldest has waited `wait_s`. `batches` counts the batches run."""

    def __init__(self, listener: Any, max_batch: int = 8, wait_s: float = 0.005):
        if max_batch < 1 or wait_s < 0:
            raise ValueError(f"need max_batch >= 1 and wait >= 0, got {max_batch}, {wait_s}")
        self.listener, self.max_batch, self.wait_s = listener, max_batch, wait_s
        self.batches = 0
        self._pending: list[_Job] = []
        self._changed = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="batcher", daemon=True)
        self._worker.start()

    def submit(self, request: Any, options: Any) -> Future:
        """A future of the `inference.Reply` to `request`; it holds the model's exception if
        the batch failed."""
        job = _Job(request, options, time.monotonic(), Future())
        with self._changed:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(job)
            self._changed.notify()
        return job.future

    def close(self) -> None:
        """Answers the requests already submitted, then stops the worker."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        self._worker.join()

    def _take(self) -> list[_Job] | None:
        """The next batch, waiting for it; None once closed and nothing is left."""
        with self._changed:
            while not self._pending and not self._closed:
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
            try:
                replies = self.listener.reply(padded, batch[0].options, size)
            except Exception as err:  # the callers answer 500; the worker goes on
                for job in batch:
                    job.future.set_exception(err)
            else:
                for job, reply in zip(batch, replies[: len(batch)], strict=True):
                    job.future.set_result(reply)
            self.batches += 1


class ChatServer(ThreadingHTTPServer):
    """A threaded HTTP server around one `inference.Listener`, run by a `Batcher`."""

    daemon_threads = True
    request_queue_size = 512  # the default backlog of 5 drops bursts of concurrent clients

    def __init__(
        self,
        address: tuple[str, int],
        listener: Any,
        model_name: str,
        max_batch: int = 8,
        batch_wait_s: float = 0.005,
    ):
        self.batcher = Batcher(listener, max_batch, batch_wait_s)
        super().__init__(address, _Handler)
        self.listener, self.model_name = listener, model_name
        self.default_lang = listener.config.data.target_lang
        self.created = int(time.time())

    def server_close(self) -> None:
        super().server_close()
        self.batcher.close()

    def complete(self, body: Any) -> dict:
        """The chat completion object answering `body`."""
        request, options = parse_chat(body, self.model_name, self.default_lang)
        try:  # here, not in the batch: one request's fault must not fail the others
            self.listener.prepare(options)
            self.listener.check(request, options)
        except ValueError as err:
            raise RequestError(str(err)) from None
        reply = self.batcher.submit(request, options).result()
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "finish_reason": "stop",
                }
            ],
        }


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse their connections
    timeout = 60  # seconds a client may stall (an idle connection, a body cut short)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the console under load

    def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(
        self, status: int, message: str, param: str | None = None, headers: dict | None = None
    ) -> None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        error = {"message": message, "type": kind, "param": param, "code": None}
        self._send(status, {"error": error}, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server's own refusals (a malformed request line, an unknown method, headers
        # too long) answer in the API's JSON, not in HTML.
        self.close_connection = True
        self._error(code, message or HTTPStatus(code).phrase)

    def _routed(self) -> bool:
        """Whether this method and path are served; answers 404 or 405 if not."""
        method = ROUTES.get(self.path.partition("?")[0].rstrip("/"))
        if method == self.command:
            return True
        self.close_connection = True  # the unread body would corrupt the next request
        if method is None:
            self._error(HTTPStatus.NOT_FOUND, f"no route {self.command} {self.path}")
        else:
            self._error(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{self.path} answers {method}, not {self.command}",
                headers={"Allow": method},
            )
        return False

    do_PUT = do_PATCH = do_DELETE = _routed  # none is served: 404 or 405

    def do_GET(self) -> None:
        if not self._routed():
            return
        model = {
            "id": self.server.model_name,
            "object": "model",
            "created": self.server.created,
            "owned_by": "lisendiff-jax",
        }
        self._send(HTTPStatus.OK, {"object": "list", "data": [model]})

    def do_POST(self) -> None:
        if not self._routed():
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
            return
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {MAX_BODY_BYTES} bytes")
            return
        if length < 0:  # read(-1) would wait for the client to close
            self.close_connection = True
            self._error(HTTPStatus.BAD_REQUEST, f"Content-Length {length} is negative")
            return
        try:
            body = json.loads(self.rfile.read(length).decode("utf-8"))
        except UnicodeDecodeError as err:
            self._error(HTTPStatus.BAD_REQUEST, f"the body is not UTF-8: {err}")
            return
        # ValueError: also an integer past Python's digit limit; RecursionError: deep nesting.
        except (ValueError, RecursionError) as err:
            self._error(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {err}")
            return
        try:
            self._send(HTTPStatus.OK, self.server.complete(body))
        except RequestError as err:
            self._error(err.status, str(err), err.param)
        except Exception as err:  # the model failed: answer, log, and keep serving
            traceback.print_exc(file=sys.stderr)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"model error: {type(err).__name__}")


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
