"""OpenAI-compatible endpoints: each role of the evaluation (speaker, listener, judge) talks to
one, whether it is our own `lisendiff_jax.serve`, a vLLM server with a baseline such as
SoulChat, or a hosted API."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import openai

NO_KEY = "unused"  # the openai client insists on a key; local servers ignore it


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where a model answers. The API key is read from the environment variable named
    `api_key_env` when a client is made: it is never stored here, so never printed or logged.
    `extra_body` goes with every request (e.g. {"style": "empathy", "lang": "yue"} for our
    server)."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    extra_body: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Chat(Protocol):
    """What the evaluation needs of a model: the assistant's reply to `messages`."""

    def complete(self, messages: Sequence[Mapping[str, str]], **sampling: Any) -> str: ...


class Client:
    """An `Endpoint` through the `openai` client. At most `concurrency` requests are in flight
    at once (threads share one client); each times out after `timeout_s` and the client
    retries connection errors, 408, 409, 429 and 5xx answers `retries` times with exponential
    backoff."""

    def __init__(
        self, endpoint: Endpoint, concurrency: int = 8, timeout_s: float = 120.0, retries: int = 3
    ):
        self.endpoint = endpoint
        self._client = openai.OpenAI(
            base_url=endpoint.base_url,
            api_key=os.environ.get(endpoint.api_key_env) or NO_KEY,
            timeout=timeout_s,
            max_retries=retries,
        )
        self._slots = threading.BoundedSemaphore(concurrency)

    def complete(self, messages: Sequence[Mapping[str, str]], **sampling: Any) -> str:
        """The reply to `messages`; `sampling` takes temperature, top_p, max_tokens, seed."""
        with self._slots:
            response = self._client.chat.completions.create(
                model=self.endpoint.model,
                messages=list(messages),
                extra_body=dict(self.endpoint.extra_body) or None,
                **sampling,
            )
        return response.choices[0].message.content or ""

    def __repr__(self) -> str:
        return f"Client({self.endpoint.model!r} at {self.endpoint.base_url})"
