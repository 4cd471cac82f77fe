"""Tokenizer: byte-level BPE training, exact round trips, EOD discovery, save/load, CLI."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from megaloom.cli import main
from megaloom.data.tokenizer import ENDOFTEXT, Tokenizer, train_bpe
from megaloom.errors import DataError

SAMPLES = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "naïve café — Ελληνικά — 日本語 — 🚀✨ (bytes the corpus never saw: ʘ‿ʘ)",
    "line one\nline two\r\n\ttabbed",
    "",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tokenizer_path, text):
    tok = Tokenizer.from_file(tokenizer_path)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_vocab_eod_and_batch(tokenizer_path):
    tok = Tokenizer.from_file(tokenizer_path)
    assert tok.vocab_size == 400 == len(tok.hf.get_vocab(with_added_tokens=True))
    assert tok.eod_token == ENDOFTEXT
    assert tok.eod_id == tok.token_to_id(ENDOFTEXT)
    assert tok.encode(f"a{ENDOFTEXT}b")[1:-1] == [tok.eod_id]
    assert tok.encode_batch(SAMPLES) == [tok.encode(s) for s in SAMPLES]
    # merges were learned: a frequent corpus word takes fewer tokens than its bytes
    assert len(tok.encode(" Document")) < len(" Document")


def test_save_and_reload_encode_identically(tokenizer_path, tmp_path):
    tok = Tokenizer.from_file(tokenizer_path)
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_file(tmp_path)  # a directory holding tokenizer.json works too
    assert [again.encode(s) for s in SAMPLES] == [tok.encode(s) for s in SAMPLES]


def test_loaded_tokenizer_finds_eos_or_says_why(tmp_path):
    vocab = {"[UNK]": 0, "a": 1, "</s>": 2}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.save(str(tmp_path / "with_eos.json"))
    assert Tokenizer.from_file(tmp_path / "with_eos.json").eod_id == 2
    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    hf.save(str(tmp_path / "no_eos.json"))
    tok = Tokenizer.from_file(tmp_path / "no_eos.json")
    with pytest.raises(DataError, match="no end-of-document token"):
        _ = tok.eod_id


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")


def test_train_rejects_tiny_vocab_and_bad_records(corpus, tmp_path):
    with pytest.raises(DataError, match="too small"):
        train_bpe([corpus["txt"]], 100, tmp_path / "t.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "wrong key"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing key 'text'"):
        train_bpe([bad], 300, tmp_path / "t.json", show_progress=False)
    assert not (tmp_path / "t.json").exists()


def test_cli_trains_on_directory_with_json_key(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    with open(data / "a.jsonl", "w", encoding="utf-8") as f:
        for i in range(50):
            f.write(json.dumps({"body": f"sample number {i} of the body text"}) + "\n")
    (data / "b.txt").write_text("plain text paragraph\n\nanother one\n", encoding="utf-8")
    out = tmp_path / "tok.json"
    rc = main(["tokenizer", "train", "--vocab-size", "300", "--json-key", "body",
               "--output", str(out), str(data)])
    assert rc == 0
    tok = Tokenizer.from_file(out)
    assert tok.decode(tok.encode("sample number 7")) == "sample number 7"
    assert str(out) in capsys.readouterr().out
    assert main(["tokenizer", "train", "--vocab-size", "300", "--output", str(out),
                 str(tmp_path / "nope")]) == 2
