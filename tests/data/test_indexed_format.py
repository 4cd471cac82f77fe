"""`.bin`/`.idx` compatibility with megatron-core in both directions, both token dtypes, and
clear errors on malformed files."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from megaloom.data.indexed import IndexedReader, IndexedWriter, optimal_dtype
from megaloom.errors import DataError

VOCABS = {"uint16": 1000, "int32": 70000}


def _documents(vocab: int, n: int = 25, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(1, 40)) for _ in range(n)]


def _write_megaloom(prefix, docs, vocab):
    with IndexedWriter(prefix, optimal_dtype(vocab)) as writer:
        for doc in docs:
            writer.add_document(doc)


def test_optimal_dtype_matches_megatron(mcore_indexed):
    for vocab in (256, 50257, 65499, 65500, 128256):
        assert optimal_dtype(vocab) == mcore_indexed.DType.optimal_dtype(vocab)


@pytest.mark.parametrize("dtype_name", list(VOCABS))
def test_megatron_reads_megaloom_files(tmp_path, mcore_indexed, dtype_name):
    vocab = VOCABS[dtype_name]
    docs = _documents(vocab)
    _write_megaloom(tmp_path / "ml", docs, vocab)
    ref = mcore_indexed.IndexedDataset(str(tmp_path / "ml"))
    assert len(ref) == len(docs)
    assert ref.index.dtype == np.dtype(dtype_name)
    np.testing.assert_array_equal(ref.document_indices, np.arange(len(docs) + 1))
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ref[i], doc)


@pytest.mark.parametrize("dtype_name", list(VOCABS))
def test_files_are_byte_identical_to_megatron_builder(tmp_path, mcore_indexed, dtype_name):
    vocab = VOCABS[dtype_name]
    docs = _documents(vocab, seed=1)
    _write_megaloom(tmp_path / "ml", docs, vocab)
    builder = mcore_indexed.IndexedDatasetBuilder(str(tmp_path / "mc.bin"),
                                                  dtype=np.dtype(dtype_name).type)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "mc.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ml.{ext}").read_bytes() == (tmp_path / f"mc.{ext}").read_bytes()


@pytest.mark.parametrize("dtype_name", list(VOCABS))
def test_megaloom_reads_megatron_files(tmp_path, mcore_indexed, dtype_name):
    """Including documents made of several sequences (Megatron's sentence splitting)."""
    vocab = VOCABS[dtype_name]
    seqs = _documents(vocab, n=30, seed=2)
    ends = [2, 3, 7, 8, 15, 30]  # document d = sequences [ends[d-1], ends[d])
    builder = mcore_indexed.IndexedDatasetBuilder(str(tmp_path / "mc.bin"),
                                                  dtype=np.dtype(dtype_name).type)
    for i, seq in enumerate(seqs):
        builder.add_item(torch.from_numpy(seq))
        if i + 1 in ends:
            builder.end_document()
    builder.finalize(str(tmp_path / "mc.idx"))

    reader = IndexedReader(tmp_path / "mc")
    assert reader.dtype == np.dtype(dtype_name)
    assert len(reader) == len(seqs) and reader.num_documents == len(ends)
    np.testing.assert_array_equal(reader.document_indices, [0, *ends])
    for i, seq in enumerate(seqs):
        np.testing.assert_array_equal(reader[i], seq)
    starts, lengths = reader.document_spans()
    for d, (b, e) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        expected = np.concatenate(seqs[b:e])
        np.testing.assert_array_equal(reader.tokens(int(starts[d]), int(lengths[d])), expected)
    clone = pickle.loads(pickle.dumps(reader))
    np.testing.assert_array_equal(clone[5], seqs[5])


def _good_files(tmp_path):
    _write_megaloom(tmp_path / "x", _documents(1000, n=5), 1000)
    return tmp_path / "x.idx", tmp_path / "x.bin"


@pytest.mark.parametrize("damage, message", [
    (lambda idx, b: idx.write_bytes(b"NOTMAGIC!" + idx.read_bytes()[9:]), "bad magic"),
    (lambda idx, b: idx.write_bytes(idx.read_bytes()[:9] + struct.pack("<Q", 2)
                                    + idx.read_bytes()[17:]), "unsupported index version 2"),
    (lambda idx, b: idx.write_bytes(idx.read_bytes()[:17] + b"\x09" + idx.read_bytes()[18:]),
     "unknown dtype code 9"),
    (lambda idx, b: idx.write_bytes(idx.read_bytes()[:20]), "truncated index"),
    (lambda idx, b: idx.write_bytes(idx.read_bytes()[:-8]), "does not match its header"),
    (lambda idx, b: b.write_bytes(b.read_bytes()[:-2]), "does not match its index"),
    (lambda idx, b: b.write_bytes(b.read_bytes() + b"\0\0"), "does not match its index"),
    (lambda idx, b: b.unlink(), "not found"),
])
def test_malformed_files_raise_data_error(tmp_path, damage, message):
    idx, binp = _good_files(tmp_path)
    IndexedReader(tmp_path / "x")  # intact files read fine
    damage(idx, binp)
    with pytest.raises(DataError, match=message):
        IndexedReader(tmp_path / "x")


def test_failed_write_leaves_old_files_and_no_temporaries(tmp_path):
    idx, binp = _good_files(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="boom"), IndexedWriter(tmp_path / "x", np.uint16) as w:
        w.add_document([1, 2, 3])
        raise RuntimeError("boom")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_empty_dataset_round_trips(tmp_path):
    with IndexedWriter(tmp_path / "e", np.uint16):
        pass
    reader = IndexedReader(tmp_path / "e")
    assert len(reader) == 0 and reader.num_documents == 0 and reader.num_tokens == 0
