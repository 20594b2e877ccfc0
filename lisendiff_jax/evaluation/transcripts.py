"""Append-only JSONL result files that survive a kill: every finished record is one line,
written whole and synced, and a run that starts again reads what is there and goes on."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


class ResultsFile:
    """Records of one run in `path`, keyed by `key(record)`. Opening it repairs a torn last
    line (a kill in the middle of a write leaves a line with no newline: its record was not
    finished, so it is dropped and redone). Appends are thread-safe. With `path` None the
    records are kept in memory only."""

    def __init__(self, path: str | os.PathLike | None, key_fields: tuple[str, ...]):
        self.path, self.key_fields = None if path is None else Path(path), key_fields
        self._lock = threading.Lock()
        self.records = self._read()

    def key(self, record: dict) -> tuple:
        return tuple(record[f] for f in self.key_fields)

    def done(self) -> set[tuple]:
        return {self.key(r) for r in self.records}

    def _read(self) -> list[dict]:
        if self.path is None or not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        records = []
        for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.path}:{number}: not a JSON record ({err})") from None
        return records

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "ab") as f:
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
            self.records.append(record)
