"""The embedded default corpus: built once from Python's own documentation, then reused."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megaloom.config import DataConfig
from megaloom.data import default_corpus as dc
from megaloom.data.gpt_dataset import build_gpt_datasets
from megaloom.data.indexed import IndexedReader
from megaloom.data.tokenizer import Tokenizer


def test_default_corpus_is_python_documentation(default_data):
    _, tokenizer_path, prefix, seconds = default_data
    assert seconds < 60
    tok = Tokenizer.from_file(tokenizer_path)
    assert tok.vocab_size == 4096
    reader = IndexedReader(prefix)
    assert reader.num_documents > 500 and reader.num_tokens > 800_000
    last_tokens = reader.tokens(0, reader.num_tokens)[
        np.cumsum(reader.sequence_lengths) - 1]
    assert (last_tokens == tok.eod_id).all()  # every document ends with <|endoftext|>
    text = "".join(tok.decode(reader[i]) for i in range(reader.num_documents))
    for phrase in ("Return", "the ", "function", "Python"):
        assert phrase in text


def test_second_call_reuses_the_cache(default_data, monkeypatch):
    cache, tokenizer_path, prefix, _ = default_data
    stamp = Path(f"{prefix}.bin").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("default corpus rebuilt although cached")

    monkeypatch.setattr(dc, "train_bpe", no_rebuild)
    assert dc.ensure_default_data(str(cache), vocab_size=4096) == (tokenizer_path, prefix)
    assert Path(f"{prefix}.bin").stat().st_mtime_ns == stamp


def test_tiny_recipe_shapes_build_from_it(default_data):
    cache, _, prefix, _ = default_data
    config = DataConfig(prefixes=[prefix], cache_dir=str(cache))
    train, valid, test = build_gpt_datasets(config, 128, 1234, (400 * 16, 5 * 8 * 8, 8 * 8))
    assert (len(train), len(valid), len(test)) == (6400, 320, 64)
    for ds in (train, valid, test):
        samples = np.stack([ds[i] for i in range(0, len(ds), 7)])
        assert samples.shape[1] == 129 and samples.min() >= 0 and samples.max() < 4096


def test_documents_are_read_without_importing(tmp_path):
    package = tmp_path / "lib"
    package.mkdir()
    (package / "mod.py").write_text(
        '"""Module doc."""\nraise SystemExit("must not run")\n# a comment block long enough '
        'to be kept\n# spanning two lines\ndef f():\n    """Function doc."""\n',
        encoding="utf-8")
    (package / "tests").mkdir()
    (package / "tests" / "test_x.py").write_text('"""excluded"""\n', encoding="utf-8")
    assert list(dc.stdlib_documents(package)) == [
        "Module doc.\n\nFunction doc.\n\na comment block long enough to be kept\n"
        "spanning two lines"]
