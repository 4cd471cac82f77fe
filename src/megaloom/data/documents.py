"""Reading raw text documents from `.txt` and JSONL files, streamed, with errors naming file:line.

Owns the input formats shared by tokenizer training and preprocessing:

- `.jsonl` / `.json`: one JSON object per line; the document is the string under `json_key`.
  Blank lines are ignored.
- `.txt`: documents are paragraphs separated by one or more blank (whitespace-only) lines, so a
  large file streams paragraph by paragraph; line breaks inside a paragraph are kept.

Reading is split in two steps so worker processes can do the expensive half: `iter_raw_records`
yields `(line_number, raw_bytes)` without decoding, `parse_record` decodes UTF-8 / JSON and
raises `DataError` naming the file and line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from megaloom.errors import DataError

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)


def file_kind(path: Path) -> str:
    """'jsonl' or 'txt' from the file name; anything else is a `DataError`."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TEXT_SUFFIXES:
        return "txt"
    raise DataError(f"{path}: unsupported input type {suffix or '(no suffix)'!r}; "
                    f"expected one of {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}")


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named directly, plus every `.txt`/`.jsonl`/`.json` file under named directories
    (recursively, sorted so the order is reproducible)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise DataError(f"{path}: directory holds no .txt, .jsonl or .json files")
            files.extend(found)
        elif path.is_file():
            file_kind(path)
            files.append(path)
        else:
            raise DataError(f"input not found: {path}")
    if not files:
        raise DataError("no input files given")
    return files


def iter_raw_records(path: Path, kind: str) -> Iterator[tuple[int, bytes]]:
    """Yield `(first_line_number, raw_bytes)` per document, reading the file line by line."""
    with open(path, "rb") as handle:
        if kind == "jsonl":
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    yield number, line
            return
        start, lines = 0, []
        for number, line in enumerate(handle, start=1):
            if line.strip():
                if not lines:
                    start = number
                lines.append(line)
            elif lines:
                yield start, b"".join(lines)
                lines = []
        if lines:
            yield start, b"".join(lines)


def parse_record(path: Path, kind: str, line: int, raw: bytes, json_key: str) -> str:
    """Decode one raw record into document text; `DataError` names `path:line` on bad input."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = line + raw[: exc.start].count(b"\n")
        column = exc.start - raw.rfind(b"\n", 0, exc.start)
        raise DataError(f"{path}:{bad_line}: invalid UTF-8 ({exc.reason} at byte {column} "
                        "of the line)") from None
    if kind == "txt":
        return text.rstrip("\r\n")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        message = f"{path}:{line}: malformed JSON ({exc.msg} at column {exc.colno})"
        raise DataError(message) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
    if json_key not in obj:
        raise DataError(f"{path}:{line}: missing key {json_key!r} "
                        f"(keys: {', '.join(map(repr, list(obj)[:8])) or 'none'})")
    value = obj[json_key]
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: key {json_key!r} holds {type(value).__name__}, "
                        "expected a string")
    return value


@dataclass
class BadRecords:
    """Counts records skipped under `skip_bad`, logging the first few reasons."""

    count: int = 0
    log_first: int = 5

    def add(self, error: DataError | str) -> None:
        self.count += 1
        if self.count <= self.log_first:
            logger.warning("skipping bad record: %s", error)


def iter_documents(files: Iterable[Path], json_key: str = "text",
                   bad: BadRecords | None = None) -> Iterator[str]:
    """Document texts of all `files` in order. With `bad` given, bad records are counted there
    and skipped; otherwise the first one raises `DataError`."""
    for path in files:
        kind = file_kind(path)
        for line, raw in iter_raw_records(path, kind):
            try:
                yield parse_record(path, kind, line, raw, json_key)
            except DataError as exc:
                if bad is None:
                    raise
                bad.add(exc)
