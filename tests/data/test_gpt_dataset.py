"""GPT samples against a flat numpy token stream, seeded shuffling, document splits, exact
blend proportions, epochs, index caching and clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from megaloom.config import ConfigError, DataConfig
from megaloom.data import gpt_dataset as gd
from megaloom.data.blend import blend_counts, parse_blend
from megaloom.data.indexed import IndexedWriter
from megaloom.errors import DataError

SEQ = 16


def _write(prefix, num_docs: int, base: int, seed: int = 0) -> list[np.ndarray]:
    """Documents whose tokens identify them: token = base + 100 * doc + position % 100."""
    rng = np.random.default_rng(seed)
    docs = [base + 100 * d + np.arange(rng.integers(1, 60)) % 100 for d in range(num_docs)]
    docs[3] = docs[3][:0]  # an empty document is skipped, not an error
    with IndexedWriter(prefix, np.uint16) as writer:
        for doc in docs:
            writer.add_document(doc)
    return docs


def _config(tmp_path, prefixes, split="80,15,5") -> DataConfig:
    return DataConfig(prefixes=[str(p) if not isinstance(p, float) else p for p in prefixes],
                      split=split, cache_dir=str(tmp_path / "cache"))


def _reference_samples(docs, begin: int, end: int, ds) -> list[np.ndarray]:
    """Sample j of the flat token stream of documents [begin, end) taken in `ds.doc_idx` order,
    after checking that order is a full permutation of the non-empty documents per epoch."""
    nonempty = [d for d in range(begin, end) if len(docs[d])]
    order = np.asarray(ds.doc_idx)
    for epoch in range(0, len(order), len(nonempty)):
        chunk = order[epoch:epoch + len(nonempty)]
        assert len(set(chunk.tolist())) == len(chunk) and chunk.max() < len(nonempty)
    stream = np.concatenate([docs[nonempty[k]] for k in order])
    return [stream[j * SEQ: j * SEQ + SEQ + 1] for j in range(len(ds))]


def test_samples_equal_the_flat_token_stream(tmp_path):
    docs = _write(tmp_path / "a", 40, 0)
    train, valid, test = gd.build_gpt_datasets(_config(tmp_path, [tmp_path / "a"]), SEQ, 7,
                                               (300, 20, 5))
    assert (len(train), len(valid), len(test)) == (300, 20, 5)
    for ds, (begin, end) in zip((train, valid, test), [(0, 32), (32, 38), (38, 40)],
                                strict=True):
        expected = _reference_samples(docs, begin, end, ds)
        for i in range(len(ds)):
            sample = ds[i]
            assert sample.dtype == np.int64 and sample.shape == (SEQ + 1,)
            np.testing.assert_array_equal(sample, expected[int(ds.shuffle_idx[i])])
        assert sorted(ds.shuffle_idx) == list(range(len(ds)))
    train_tokens = sum(len(docs[d]) for d in range(32))
    assert len(train.doc_idx) == -(-(300 * SEQ + 1) // train_tokens) * 31  # epochs x docs


def test_split_is_by_documents_without_overlap(tmp_path):
    docs = _write(tmp_path / "a", 60, 0)
    splits = gd.build_gpt_datasets(_config(tmp_path, [tmp_path / "a"], "70,20,10"), SEQ, 1,
                                   (50, 20, 10))
    seen = []
    for ds, (begin, end) in zip(splits, [(0, 42), (42, 54), (54, 60)], strict=True):
        doc_ids = {int(t) // 100 for i in range(len(ds)) for t in ds[i]}
        assert doc_ids <= set(range(begin, end))
        seen.append(doc_ids)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert len(docs) == 60


def test_shuffling_is_deterministic_by_seed(tmp_path):
    _write(tmp_path / "a", 40, 0)
    def samples(seed, cache):
        config = DataConfig(prefixes=[str(tmp_path / "a")], split="1",
                            cache_dir=str(tmp_path / cache))
        train, _, _ = gd.build_gpt_datasets(config, SEQ, seed, (64, 0, 0))
        return np.stack([train[i] for i in range(len(train))])
    np.testing.assert_array_equal(samples(3, "c1"), samples(3, "c2"))
    assert not np.array_equal(samples(3, "c1"), samples(4, "c1"))


def test_zero_weight_or_zero_samples_give_none(tmp_path):
    _write(tmp_path / "a", 40, 0)
    train, valid, test = gd.build_gpt_datasets(_config(tmp_path, [tmp_path / "a"], "9,1,0"),
                                               SEQ, 0, (10, 0, 5))
    assert len(train) == 10 and valid is None and test is None


def test_blend_follows_weights_exactly(tmp_path):
    _write(tmp_path / "a", 50, 0)
    _write(tmp_path / "b", 50, 30000, seed=1)
    config = _config(tmp_path, [0.3, tmp_path / "a", 0.7, tmp_path / "b"], "1")
    train, _, _ = gd.build_gpt_datasets(config, SEQ, 0, (1001, 0, 0))
    origin = np.array([int(train[i].max() >= 30000) for i in range(len(train))])
    assert all((train[i] >= 30000).all() or (train[i] < 30000).all() for i in range(len(train)))
    assert (len(origin), int(origin.sum())) == (1001, 701)  # 300.3 -> 300, 700.7 -> 701
    # interleaved evenly: every prefix of the blend keeps the proportion within one sample
    running = np.cumsum(origin) - 0.7 * np.arange(1, len(origin) + 1)
    assert np.abs(running).max() <= 1.0


def test_blend_counts_and_plain_list_weights(tmp_path):
    assert blend_counts([1, 1, 1], 100).tolist() == [34, 33, 33]
    assert blend_counts([0.25, 0.75], 8).tolist() == [2, 6]
    assert blend_counts([5, 0], 7).tolist() == [7, 0]
    docs_a = _write(tmp_path / "a", 30, 0)
    docs_b = _write(tmp_path / "b", 30, 30000, seed=1)
    train, _, _ = gd.build_gpt_datasets(_config(tmp_path, [tmp_path / "a", tmp_path / "b"], "1"),
                                        SEQ, 0, (500, 0, 0))
    sizes = [sum(map(len, docs_a)), sum(map(len, docs_b))]
    assert train.counts == blend_counts(sizes, 500).tolist()  # plain list: by token count
    with pytest.raises(ConfigError, match="data.prefixes"):
        parse_blend([0.5, "a", "b"])
    assert parse_blend(["x_text_document.bin"]) == (["x_text_document"], None)


def test_index_arrays_are_cached_and_reused(tmp_path, monkeypatch):
    _write(tmp_path / "a", 40, 0)
    config = _config(tmp_path, [tmp_path / "a"])
    first = gd.build_gpt_datasets(config, SEQ, 5, (100, 10, 3))
    entries = sorted((tmp_path / "cache" / "index").iterdir())
    assert len(entries) == 3 and not any(p.name.startswith(".") for p in entries)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("index arrays rebuilt although cached")

    monkeypatch.setattr(gd, "build_index_arrays", no_rebuild)
    again = gd.build_gpt_datasets(config, SEQ, 5, (100, 10, 3))
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(np.stack([a[i] for i in range(len(a))]),
                                      np.stack([b[i] for i in range(len(b))]))
    with pytest.raises(AssertionError, match="rebuilt"):  # another seed is another key
        gd.build_gpt_datasets(config, SEQ, 6, (100, 10, 3))


def test_too_few_tokens_and_bad_split_are_clear_errors(tmp_path):
    _write(tmp_path / "a", 40, 0)
    with pytest.raises(DataError, match=r"valid split .* fewer than one sample"):
        gd.build_gpt_datasets(_config(tmp_path, [tmp_path / "a"], "999,1,0"), SEQ, 0,
                              (10, 5, 0))
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2"):
        with pytest.raises(ConfigError, match="data.split"):
            gd.parse_split(bad)
    with pytest.raises(DataError, match="not found"):
        gd.build_gpt_datasets(_config(tmp_path, [tmp_path / "missing"]), SEQ, 0, (1, 1, 1))
