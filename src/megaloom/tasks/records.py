"""Task data files: JSONL records, read whole and checked, with errors naming file and line.

Fine-tuning sets are small next to pretraining corpora, so a file is read at once: every
problem (not JSONL, a line that is not a JSON object, a missing or empty field) is a
`DataError` naming `file:line` before anything is trained or written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from megaloom.errors import DataError

T = TypeVar("T")


@dataclass(frozen=True)
class Record:
    path: Path
    line: int
    fields: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def has(self, key: str) -> bool:
        return key in self.fields

    def text(self, key: str, allow_empty: bool = False) -> str:
        """The string field `key`; a `DataError` when it is missing, not a string or empty."""
        if key not in self.fields:
            raise DataError(f"{self.where}: missing field {key!r} (fields: "
                            f"{', '.join(sorted(self.fields)) or 'none'})")
        value = self.fields[key]
        if not isinstance(value, str):
            raise DataError(f"{self.where}: field {key!r} must be a string, got "
                            f"{type(value).__name__}")
        if not allow_empty and not value.strip():
            raise DataError(f"{self.where}: field {key!r} is empty")
        return value


class BadRecords:
    """Where a whole run should not die for one bad line: `check(make, *args)` returns
    `make(*args)`, or, when skipping, records the `DataError` it raised and returns None
    (raises otherwise)."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.messages: list[str] = []

    def check(self, make: Callable[..., T], *args: Any) -> T | None:
        try:
            return make(*args)
        except DataError as exc:
            if not self.skip:
                raise
            self.messages.append(str(exc))
            return None


def read_records(path: str | Path, bad: BadRecords | None = None) -> list[Record]:
    """Every non-blank line of the JSONL file `path` as a `Record` (lines that are not JSON
    objects are skipped and recorded in `bad` when it skips)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f"{path}: expected a JSONL file (.jsonl), one JSON object per line")
    records = []
    with path.open("rb") as handle:
        for line, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            record = (bad or BadRecords(False)).check(_parse, path, line, raw)
            if record is not None:
                records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def _parse(path: Path, line: int, raw: bytes) -> Record:
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}:{line}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{line}: not JSONL (invalid JSON: {exc.msg})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}:{line}: expected a JSON object, got {type(value).__name__}")
    return Record(path, line, value)
