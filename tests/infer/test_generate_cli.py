"""`megaloom generate` end to end on a saved tiny checkpoint: terminal, JSONL, database, and
bad input caught before the model loads."""

from __future__ import annotations

import io
import json

import pytest
import sqlalchemy as sa

from megaloom.cli import main
from megaloom.commands.generate import read_prompts
from megaloom.data.tokenizer import Tokenizer
from megaloom.errors import DataError, MegaloomError
from megaloom.infer import Engine, Request, SamplingParams
from megaloom.infer.database import GENERATIONS
from megaloom.loading import load_model


def expected_text(checkpoint: str, prompt: str, max_tokens: int) -> str:
    model, _, tok_path = load_model(checkpoint)
    engine = Engine(model, Tokenizer.from_file(tok_path))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return engine.generate([Request(prompt, params)])[0].completions[0].text


def test_terminal_output_streams_prompt_and_greedy_completion(checkpoint, capsys):
    code = main(["generate", checkpoint, "The quick", "--greedy", "--max-tokens", "8",
                 "--ignore-eos", "--device", "cpu"])
    assert code == 0
    out = capsys.readouterr().out
    assert out == "The quick" + expected_text(checkpoint, "The quick", 8) + "\n"


def test_jsonl_file_prompts_drafts_and_db(checkpoint, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The dog"}\n\n{"prompt": "Pack my box"}\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    db = f"sqlite:///{tmp_path / 'gen.db'}"
    args = ["generate", checkpoint, "--file", str(prompts), "--n", "2", "--seed", "7",
            "--max-tokens", "5", "--top-k", "20", "--ignore-eos", "--logprobs", "2",
            "--output", str(out), "--db", db]
    assert main(args) == 0
    assert main(args) == 0  # a rerun appends
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 8
    first = [(x["prompt"], x["draft_index"], x["completion"]) for x in lines[:4]]
    again = [(x["prompt"], x["draft_index"], x["completion"]) for x in lines[4:]]
    assert first == again  # same seed, same completions
    assert {x["completion_tokens"] for x in lines} == {5}
    assert all(len(x["logprobs"]) == 5 and len(x["logprobs"][0]["top"]) == 2 for x in lines)
    engine = sa.create_engine(db)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(GENERATIONS)).mappings().all()
    assert sorted(r["id"] for r in rows) == sorted(x["id"] for x in lines)


def test_invalid_sampling_value_fails_before_loading(tmp_path, capsys):
    code = main(["generate", str(tmp_path / "missing"), "hi", "--temperature", "-1"])
    assert code == 2
    assert "temperature" in capsys.readouterr().err


def test_unreachable_database_fails_before_loading_and_keeps_rows(checkpoint, tmp_path, capsys):
    db = f"sqlite:///{tmp_path / 'keep.db'}"
    assert main(["generate", checkpoint, "The", "--max-tokens", "2", "--db", db]) == 0
    code = main(["generate", str(tmp_path / "missing"), "hi",
                 "--db", "postgresql://nobody@127.0.0.1:1/none"])
    assert code == 2
    assert "cannot use database" in capsys.readouterr().err
    with sa.create_engine(db).connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(GENERATIONS)).scalar() == 1


def test_empty_and_too_long_prompts_are_errors(checkpoint, capsys):
    assert main(["generate", checkpoint, ""]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["generate", checkpoint, "word " * 200]) == 2
    assert "longer than the model's context" in capsys.readouterr().err


def test_read_prompts_sources(tmp_path):
    assert read_prompts(["a", "b"], None, io.StringIO()) == ["a", "b"]
    assert read_prompts([], None, io.StringIO("x\n\ny\n")) == ["x", "y"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing or empty 'prompt'"):
        read_prompts([], str(bad), io.StringIO())
    with pytest.raises(MegaloomError, match="not both"):
        read_prompts(["a"], str(bad), io.StringIO())


def test_stream_printer_keeps_prompt_order_with_interleaved_events():
    from megaloom.commands.generate import StreamPrinter
    from megaloom.infer import Event

    out = io.StringIO()
    printer = StreamPrinter(["A", "B"], 2, out)
    for request, index, text, reason in [
        ("prompt-1", 0, "b0", None), ("prompt-0", 1, "a1", "stop"), ("prompt-0", 0, "a0", None),
        ("prompt-1", 1, "b1", "length"), ("prompt-0", 0, "!", "length"),
        ("prompt-1", 0, "!", "stop"),
    ]:
        printer.on_event(Event(request, index, None, text, finish_reason=reason))
    assert out.getvalue() == ("=== prompt 1 draft 1/2 ===\nAa0!\n=== prompt 1 draft 2/2 ===\nAa1\n"
                              "=== prompt 2 draft 1/2 ===\nBb0!\n=== prompt 2 draft 2/2 ===\nBb1\n")
