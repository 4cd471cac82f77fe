"""Storage of generations in real databases: SQLite always, PostgreSQL when configured.

`MEGALOOM_TEST_POSTGRES_URL` names a PostgreSQL server (`.ci/run` starts one with
`scripts/ci/start_postgres.sh`). Without it the PostgreSQL cases are skipped with that reason,
except under CI (`CI=true`), where a missing server is a failure.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
import sqlalchemy as sa

from megaloom.errors import MegaloomError
from megaloom.infer import Engine, Request, SamplingParams
from megaloom.infer.database import GENERATIONS, DatabaseSink
from megaloom.infer.sinks import JsonlSink, records_from

POSTGRES_ENV = "MEGALOOM_TEST_POSTGRES_URL"


def postgres_url() -> str:
    url = os.environ.get(POSTGRES_ENV)
    if url:
        return url
    reason = f"no PostgreSQL server configured: set {POSTGRES_ENV} (scripts/ci/start_postgres.sh)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must run the PostgreSQL storage tests")
    pytest.skip(reason)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'generations.db'}"
    return postgres_url()


@pytest.fixture
def outputs(make_model, tokenizer):
    engine = Engine(make_model("gpt2", vocab_size=tokenizer.vocab_size), tokenizer)
    params = SamplingParams(max_tokens=6, n=2, seed=5, ignore_eos=True)
    return engine.generate([Request("The dog", params), Request("Stop here", params)])


def stored(url: str, ids: list[str]) -> dict[str, dict]:
    sink = DatabaseSink(url)
    with sink.engine.connect() as conn:
        rows = conn.execute(sa.select(GENERATIONS).where(GENERATIONS.c.id.in_(ids))).mappings()
        result = {row["id"]: dict(row) for row in rows}
    sink.close()
    return result


def test_database_round_trip_and_rerun_appends(db_url, outputs):
    first = records_from(outputs[0], "tiny-model")
    second = records_from(outputs[1], "tiny-model")
    sink = DatabaseSink(db_url)
    sink.write(first)
    sink.close()
    sink = DatabaseSink(db_url)  # a rerun: same table, new rows, old rows kept
    sink.write(second)
    sink.close()
    rows = stored(db_url, [r.id for r in first + second])
    assert len(rows) == 4
    for record, completion in zip(first, outputs[0].completions, strict=True):
        row = rows[record.id]
        assert row["prompt"] == "The dog" and row["model"] == "tiny-model"
        assert row["completion"] == completion.text
        assert row["finish_reason"] == "length"
        assert row["prompt_tokens"] == len(outputs[0].prompt_token_ids)
        assert row["completion_tokens"] == 6
        assert row["params"]["seed"] == 5 and row["params"]["n"] == 2
        assert row["latency_s"] > 0 and row["created_at"] is not None


def test_failed_write_stores_nothing_and_keeps_old_rows(db_url, outputs):
    sink = DatabaseSink(db_url)
    old = records_from(outputs[0], "m")
    sink.write(old)
    batch = records_from(outputs[1], "m")
    batch[1].id = old[0].id  # second insert collides: the whole transaction must roll back
    with pytest.raises(MegaloomError, match="were not stored"):
        sink.write(batch)
    sink.close()
    rows = stored(db_url, [r.id for r in old] + [batch[0].id])
    assert set(rows) == {r.id for r in old}
    assert rows[old[0].id]["prompt"] == "The dog"


@pytest.mark.parametrize(("url", "message"), [
    ("nosuchdialect://x/y", "bad database URL"),
    ("not a url", "bad database URL"),
    ("postgresql://nobody@127.0.0.1:1/none", "cannot use database"),
])
def test_bad_or_unreachable_database_is_a_clear_error(url, message):
    with pytest.raises(MegaloomError, match=message):
        DatabaseSink(url)


def test_password_is_hidden_in_errors():
    with pytest.raises(MegaloomError) as info:
        DatabaseSink("postgresql://user:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(info.value)


def test_jsonl_sink_appends_whole_lines(tmp_path, outputs):
    path = tmp_path / "out.jsonl"
    for output in outputs:
        sink = JsonlSink(path)
        sink.write(records_from(output, "m"))
        sink.close()
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [line["prompt"] for line in lines] == ["The dog"] * 2 + ["Stop here"] * 2
    assert [line["draft_index"] for line in lines] == [0, 1, 0, 1]
    assert all(uuid.UUID(line["id"]) for line in lines)
