"""How readers report bad input: fail loudly by default, or skip and count when asked."""

from __future__ import annotations

import dataclasses

from lisendiff_jax.errors import UserError

ON_ERROR = ("raise", "skip")


class DataError(UserError, ValueError):
    """A corpus file, row or setting that cannot be read; the message names where."""


class BadRecord(ValueError):
    """One malformed row or dialogue; the reader adds where it is and hands it to `Problems`."""


class SkippedRowsWarning(UserWarning):
    """Rows were skipped because the caller asked for `on_error="skip"`."""


def one_line(value: object, limit: int = 60) -> str:
    """A short single-line repr, so an error message stays on one line whatever the data holds."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass
class Problems:
    """Collects bad records under one policy, so every reader treats them the same way.

    With `on_error="raise"` the first bad record stops reading with a `DataError`; with
    `"skip"` it is remembered (never dropped silently) and reading goes on.
    """

    on_error: str = "raise"
    messages: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise DataError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")

    def report(self, where: str, why: str, skipping: str = "") -> None:
        """Raises, or records the problem; `skipping` says what else is left out with it."""
        message = f"{where}: {why}"
        if self.on_error == "raise":
            raise DataError(message)
        self.messages.append(f"{message} ({skipping})" if skipping else message)

    @property
    def skipped(self) -> int:
        return len(self.messages)
