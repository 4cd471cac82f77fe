"""`megaloom preprocess`: contents, worker-count independence, bad input, atomic outputs,
bounded memory."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from megaloom.cli import main
from megaloom.data import preprocess as pp
from megaloom.data.indexed import IndexedReader
from megaloom.data.tokenizer import Tokenizer
from megaloom.errors import DataError


def _outputs(prefix) -> dict[str, bytes]:
    return {ext: open(f"{prefix}.{ext}", "rb").read() for ext in ("bin", "idx")}


def test_contents_equal_tokenized_documents_and_megatron_agrees(corpus, tokenizer_path,
                                                                 tmp_path, mcore_indexed):
    stats = pp.preprocess([corpus["jsonl"], corpus["txt"]], tmp_path / "out", tokenizer_path,
                          append_eod=True, chunk_bytes=300, show_progress=False)
    assert stats.prefix == f"{tmp_path / 'out'}_text_document"
    tok = Tokenizer.from_file(tokenizer_path)
    texts = corpus["jsonl_texts"] + corpus["txt_texts"]
    expected = [tok.encode(t) + [tok.eod_id] for t in texts]
    reader = IndexedReader(stats.prefix)
    ref = mcore_indexed.IndexedDataset(stats.prefix)
    assert len(reader) == len(ref) == len(texts) == stats.documents
    assert stats.tokens == sum(map(len, expected))
    for i, ids in enumerate(expected):
        np.testing.assert_array_equal(reader[i], ids)
        np.testing.assert_array_equal(ref[i], ids)
    assert tok.decode(reader[len(corpus["jsonl_texts"])][:-1]) == corpus["txt_texts"][0]


def test_one_and_two_workers_write_identical_bytes(corpus, tokenizer_path, tmp_path):
    prefixes = []
    for workers in (1, 2):
        stats = pp.preprocess([corpus["dir"]], tmp_path / f"w{workers}", tokenizer_path,
                              workers=workers, chunk_bytes=500, show_progress=False)
        prefixes.append(stats.prefix)
    assert _outputs(prefixes[0]) == _outputs(prefixes[1])


def test_cli_prints_prefix_and_uses_json_key(tokenizer_path, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"body": f"text {i}"}) + "\n" for i in range(10)),
                   encoding="utf-8")
    rc = main(["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "p"),
               "--tokenizer", str(tokenizer_path), "--json-key", "body", "--append-eod",
               "--workers", "2", "--no-progress"])
    assert rc == 0
    prefix = f"{tmp_path / 'p'}_body_document"
    assert capsys.readouterr().out.startswith(prefix)
    assert len(IndexedReader(prefix)) == 10


BAD_JSONL = [
    ('{"text": "ok"}\n{"text": "unterminated\n', r"bad.jsonl:2: malformed JSON"),
    ('{"text": "ok"}\n\n{"title": "no text"}\n', r"bad.jsonl:3: missing key 'text'"),
    ('{"text": 5}\n', r"bad.jsonl:1: key 'text' holds int"),
    ('["a list"]\n', r"bad.jsonl:1: expected a JSON object"),
]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("content, message", BAD_JSONL)
def test_bad_jsonl_names_file_and_line(tokenizer_path, tmp_path, content, message, workers):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        pp.preprocess([bad], tmp_path / "o", tokenizer_path, workers=workers,
                      show_progress=False)
    assert list(tmp_path.iterdir()) == [bad]


def test_invalid_utf8_names_file_and_line(tokenizer_path, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid UTF-8"):
        pp.preprocess([bad], tmp_path / "o", tokenizer_path, show_progress=False)
    txt = tmp_path / "bad.txt"  # the third line of a paragraph starting at line 3
    txt.write_bytes(b"first paragraph\n\nsecond\nparagraph\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"bad.txt:5: invalid UTF-8"):
        pp.preprocess([txt], tmp_path / "o", tokenizer_path, show_progress=False)


def test_skip_bad_counts_and_keeps_good_documents(tokenizer_path, tmp_path, capsys):
    src = tmp_path / "mixed.jsonl"
    good = [f"good document {i}" for i in range(6)]
    lines = [json.dumps({"text": t}).encode() for t in good]
    lines[1:1] = [b"{broken"]
    lines[4:4] = [b'{"other": 1}', b'{"text": "\xff\xfe"}']
    src.write_bytes(b"\n".join(lines) + b"\n")
    rc = main(["preprocess", "--input", str(src), "--output-prefix", str(tmp_path / "o"),
               "--tokenizer", str(tokenizer_path), "--skip-bad", "--no-progress"])
    assert rc == 0
    assert "3 bad record(s) skipped" in capsys.readouterr().out
    tok = Tokenizer.from_file(tokenizer_path)
    reader = IndexedReader(f"{tmp_path / 'o'}_text_document")
    assert [tok.decode(reader[i]) for i in range(len(reader))] == good


def test_failed_run_keeps_previous_outputs_and_leaves_no_temporaries(corpus, tokenizer_path,
                                                                       tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    stats = pp.preprocess([corpus["jsonl"]], out / "p", tokenizer_path, show_progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_call = pp.ChunkEncoder.__call__
    calls = []

    def interrupted(self, chunk):
        calls.append(chunk)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_call(self, chunk)

    monkeypatch.setattr(pp.ChunkEncoder, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess([corpus["txt"]], out / "p", tokenizer_path, chunk_bytes=200,
                      show_progress=False)
    assert len(calls) == 3
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old outputs intact
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess([corpus["txt"]], out / "fresh", tokenizer_path, chunk_bytes=200,
                      show_progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # nothing under new names
    assert stats.documents == len(corpus["jsonl_texts"])


def test_memory_stays_bounded_on_a_large_input(tokenizer_path, tmp_path):
    """A ~6 MB input processed in 16 KB chunks peaks far below the input size."""
    src = tmp_path / "big.jsonl"
    line = (json.dumps({"text": "a fairly ordinary sentence of text. " * 40}) + "\n").encode()
    with open(src, "wb") as f:
        f.write(line * (6_000_000 // len(line)))
    tracemalloc.start()
    try:
        stats = pp.preprocess([src], tmp_path / "big", tokenizer_path, chunk_bytes=16 * 1024,
                              show_progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.documents == 6_000_000 // len(line)
    assert peak < src.stat().st_size / 6, f"peak {peak} bytes"
