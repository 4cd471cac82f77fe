"""The SQL sink for generations and evaluation reports (SQLAlchemy).

`DatabaseSink` creates the `generations` table (and, for `megaloom evaluate`,
`generation_scores` with each generation's reference and scores, and `evaluations` with whole
reports) when missing and inserts each request's records in one transaction, so an interrupted
run never leaves half-written records and reruns append. It connects when built, so a bad URL
or an unreachable server is reported before any generation starts. `sqlite:///generations.db`
is the embedded default; any PostgreSQL URL works (driven by psycopg 3; `postgresql://` URLs are
routed to it).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from megaloom.errors import MegaloomError
from megaloom.infer.sinks import DEFAULT_DB_URL, GenerationRecord

METADATA = sa.MetaData()
GENERATIONS = sa.Table(
    "generations",
    METADATA,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("draft_index", sa.Integer, nullable=False),
    sa.Column("params", sa.JSON, nullable=False),
    sa.Column("completion", sa.Text, nullable=False),
    sa.Column("finish_reason", sa.String(16), nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("latency_s", sa.Float, nullable=False),
)
SCORES = sa.Table(  # `megaloom evaluate --task generate`: a generation's reference and scores
    "generation_scores",
    METADATA,
    sa.Column("generation_id", sa.String(36), sa.ForeignKey("generations.id"), primary_key=True),
    sa.Column("reference", sa.Text, nullable=False),
    sa.Column("scores", sa.JSON, nullable=False),
)
EVALUATIONS = sa.Table(  # one `megaloom evaluate` report per row
    "evaluations",
    METADATA,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("task", sa.String(32), nullable=False),
    sa.Column("report", sa.JSON, nullable=False),
)


class DatabaseSink:
    """Inserts records into the `generations` table of a SQL database."""

    def __init__(self, url: str = DEFAULT_DB_URL):
        self.display_url = url
        try:
            parsed = sa.make_url(normalize_db_url(url))
            self.display_url = parsed.render_as_string(hide_password=True)
            connect_args = {"connect_timeout": 10} if parsed.get_backend_name() == (
                "postgresql") else {}
            self.engine = sa.create_engine(parsed, connect_args=connect_args)
            METADATA.create_all(self.engine)
            with self.engine.connect() as conn:
                conn.execute(sa.select(sa.func.count()).select_from(GENERATIONS))
        except (ArgumentError, NoSuchModuleError, ValueError) as exc:
            raise MegaloomError(f"bad database URL {url!r}: {exc}") from None
        except (SQLAlchemyError, ImportError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise MegaloomError(f"cannot use database {self.display_url}: {reason}") from None

    def write(self, records: Iterable[GenerationRecord]) -> None:
        records = list(records)
        rows = [{k: v for k, v in asdict(r).items() if k != "extra"} for r in records]
        scores = [{"generation_id": r.id, "reference": r.extra["reference"],
                   "scores": r.extra["scores"]} for r in records if "reference" in r.extra]
        if not rows:
            return

        def insert(conn) -> None:
            conn.execute(GENERATIONS.insert(), rows)
            if scores:
                conn.execute(SCORES.insert(), scores)

        self._insert(insert, "this request's records were not stored")

    def write_evaluation(self, model: str, task: str, report: dict[str, Any]) -> None:
        """Store one evaluation report."""
        row = {"id": str(uuid.uuid4()), "created_at": dt.datetime.now(dt.timezone.utc),
               "model": model, "task": task, "report": report}
        self._insert(lambda conn: conn.execute(EVALUATIONS.insert(), [row]),
                     "the evaluation report was not stored")

    def _insert(self, insert, lost: str) -> None:
        try:
            with self.engine.begin() as conn:
                insert(conn)
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise MegaloomError(f"writing to database {self.display_url} failed ({lost}): "
                                f"{reason}") from None

    def close(self) -> None:
        self.engine.dispose()


def normalize_db_url(url: str) -> str:
    """Route plain PostgreSQL URLs to the psycopg 3 driver megaloom depends on."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url
