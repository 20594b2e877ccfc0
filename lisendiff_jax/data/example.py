"""The unit every reader produces and every later stage consumes."""

from __future__ import annotations

import argparse
import dataclasses
import math

STYLES = ("default", "empathy")


def parse_dial(text: str) -> tuple[float, ...]:
    """Empathy dial settings w from "0,1,2": a command line's sweep (an argparse `type`, whose
    error names the bad part). w = 0 is the default style, 1 the empathy style."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} is not a number (give e.g. 0,1,2)"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{part.strip()} is not finite")
        values.append(value)
    return tuple(values)


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
