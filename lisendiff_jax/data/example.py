"""The unit every reader produces and every later stage consumes."""

from __future__ import annotations

import dataclasses

STYLES = ("default", "empathy")


@dataclasses.dataclass(frozen=True)
class Example:
    """One (context, response) pair taken from a dialogue.

    `context` holds the earlier turns, oldest first; `response` is the listener's reply.
    `source` names the corpus format and `dialogue_id` the dialogue inside it, so any
    example can be traced back to the file it came from.
    """

    context: list[str]
    response: str
    style: str
    lang: str
    source: str = ""
    dialogue_id: str = ""

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
