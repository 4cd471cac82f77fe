"""Where finished generations go: a JSONL file, or a SQL database (`infer.database`).

Owns the stored record (`GenerationRecord`) and `JsonlSink`, which appends one JSON object per
line, each line written with a single `write` and flushed, so reruns append and an interrupted
run leaves only whole lines. `DatabaseSink` (`megaloom.infer.database`) has the same small
interface, `write(records)` and `close()`; it lives apart so that SQLAlchemy is imported only by
commands given `--db`, not by every rank of a training run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megaloom.errors import MegaloomError

if TYPE_CHECKING:
    from megaloom.infer.engine import RequestOutput

DEFAULT_DB_URL = "sqlite:///generations.db"


@dataclass
class GenerationRecord:
    """One stored completion (one draft of one prompt)."""

    model: str
    prompt: str
    draft_index: int
    params: dict[str, Any]
    completion: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["created_at"] = self.created_at.isoformat()
        row.update(row.pop("extra"))
        return row


def records_from(output: RequestOutput, model: str) -> list[GenerationRecord]:
    """The records of a finished request, one per draft (logprobs go to `extra`)."""
    prompt = output.prompt if output.prompt is not None else json.dumps(output.prompt_token_ids)
    records = []
    for completion in output.completions:
        extra: dict[str, Any] = {}
        if completion.logprobs is not None:
            extra["logprobs"] = [asdict(lp) for lp in completion.logprobs]
        if output.prompt_logprobs is not None:
            extra["prompt_logprobs"] = [lp and asdict(lp) for lp in output.prompt_logprobs]
        records.append(GenerationRecord(
            model=model, prompt=prompt, draft_index=completion.index,
            params=output.params.to_dict(), completion=completion.text or "",
            finish_reason=completion.finish_reason or "", prompt_tokens=len(
                output.prompt_token_ids), completion_tokens=len(completion.token_ids),
            latency_s=output.latency_s or 0.0, extra=extra))
    return records


class JsonlSink:
    """Appends records to a JSONL file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise MegaloomError(f"cannot open {self.path} for appending: {exc}") from None

    def write(self, records: Iterable[GenerationRecord]) -> None:
        data = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
        os.write(self._fd, data.encode("utf-8"))

    def close(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
