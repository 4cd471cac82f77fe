"""Long documents are encoded in pieces with exactly the ids of encoding them whole, in
preprocessing and tokenizer training alike; tokenizers that cannot be cut are bounded."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from megaloom.data import long_text
from megaloom.data.indexed import IndexedReader
from megaloom.data.preprocess import ChunkEncoder, preprocess
from megaloom.data.tokenizer import Tokenizer, train_bpe
from megaloom.errors import DataError

# Letters, digits, punctuation, contractions, runs of spaces, tabs and newlines, non-ASCII
# letters and spaces (no-break, ideographic), emoji.
ALPHABET = ["the", "loom", "'s", "'ll", "don't", "42", "3.14", "!", "...", "(x)", " ", "  ",
            "   ", "\t", "\n", "\n\n", "é", "naïve", "日本語", "\u00a0", "\u3000", "🙂", "-", "_"]


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) + rng.choice(["", " ", " "]) for _ in range(n))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    rng = random.Random(1)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(random_text(rng, 60) for _ in range(200)), encoding="utf-8")
    return train_bpe([corpus], 400, root / "tok.json", show_progress=False)


def test_pieces_are_bounded_and_cut_at_a_space_between_non_spaces():
    rng = random.Random(0)
    for _ in range(200):
        text = random_text(rng, rng.randint(0, 80))
        limit = rng.randint(1, 30)
        pieces = long_text.split_for_encoding(text, piece_chars=limit)
        assert "".join(pieces) == text
        for piece in pieces:  # longer only where no cut was within reach
            assert len(piece) <= limit or long_text._CUT.search(piece, 1) is None
        for piece in pieces[1:]:
            assert piece[0] == " " and not piece[1].isspace()
    assert long_text.split_for_encoding("ab cd ef", piece_chars=3) == ["ab", " cd", " ef"]
    assert long_text.split_for_encoding("abcdefgh ij", piece_chars=3) == ["abcdefgh", " ij"]


def test_encoding_in_pieces_equals_encoding_whole(tokenizer, monkeypatch):
    monkeypatch.setattr(long_text, "PIECE_CHARS", 16)
    monkeypatch.setattr(long_text, "BATCH_CHARS", 40)
    rng = random.Random(2)
    texts = [random_text(rng, rng.randint(0, 120)) for _ in range(300)]
    assert long_text.cuts_exactly(tokenizer.hf)
    arrays = long_text.encode_documents(tokenizer, texts, np.int32)
    for text, ids in zip(texts, arrays, strict=True):
        assert ids.tolist() == tokenizer.encode(text), repr(text)


def test_preprocess_of_one_long_line_equals_the_whole_encoding(tokenizer, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(long_text, "PIECE_CHARS", 64)
    text = random_text(random.Random(3), 5000)
    data = tmp_path / "one_line.jsonl"
    data.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    stats = preprocess([data], tmp_path / "out", tokenizer.source, workers=1, append_eod=True)
    reader = IndexedReader(stats.prefix)
    assert reader.num_documents == 1
    assert reader[0].tolist() == tokenizer.encode(text) + [tokenizer.eod_id]


def test_tokenizer_training_on_pieces_learns_the_same_merges(tmp_path, monkeypatch):
    text = random_text(random.Random(4), 3000)
    data = tmp_path / "line.txt"
    data.write_text(text, encoding="utf-8")
    whole = train_bpe([data], 350, tmp_path / "whole.json", show_progress=False)
    monkeypatch.setattr(long_text, "PIECE_CHARS", 32)
    cut = train_bpe([data], 350, tmp_path / "cut.json", show_progress=False)
    assert cut.hf.to_str() == whole.hf.to_str()


def test_a_tokenizer_that_cannot_be_cut_is_bounded(tmp_path, monkeypatch):
    hf = HFTokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    hf.normalizer = normalizers.Lowercase()
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / "word.json"
    hf.save(str(path))
    assert not long_text.cuts_exactly(hf)
    monkeypatch.setattr(long_text, "UNCUT_LIMIT_CHARS", 100)
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "A a"}) + "\n" + json.dumps({"text": "a " * 60}) + "\n")
    encoder = ChunkEncoder(str(path), "text", append_eod=False, skip_bad=False)
    with pytest.raises(DataError, match=r"docs.jsonl:2: a document of 120 characters is over "
                                        r"the 100-character limit"):
        preprocess([data], tmp_path / "out", str(path), workers=1)
    assert encoder.tokenizer.encode("A a") == [1, 1]
    assert Tokenizer.from_file(path).vocab_size == 3
