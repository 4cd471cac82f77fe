"""GPT pretraining samples over Megatron `.bin`/`.idx` data, and `build_gpt_datasets`.

A split's documents are laid end to end into a token stream, once per epoch, each epoch in its
own seeded random document order (`doc_idx`). Sample j is the `seq_len + 1` tokens starting at
stream position `j * seq_len` (consecutive samples share one token: the last target of one is
the first input of the next), running across document boundaries; `sample_idx[j]` holds its
start as (position in `doc_idx`, offset in that document). Exactly `num_samples` samples are
taken, as many epochs as needed, and `shuffle_idx` permutes them. This is Megatron's
doc-idx / sample-idx / shuffle-idx scheme, written here with vectorised numpy.

Train/valid/test are contiguous ranges of documents (split by documents, never inside one),
sized by `data.split` proportions. The index arrays are cached on disk (`index_cache`) and the
token data stays memory-mapped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from megaloom.config import ConfigError, DataConfig
from megaloom.data.blend import BlendedDataset, blend_counts, parse_blend
from megaloom.data.index_cache import cached_arrays, file_fingerprint
from megaloom.data.indexed import IndexedReader, idx_path
from megaloom.errors import DataError

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> tuple[float, float, float]:
    """`"969,30,1"` -> normalised train/valid/test weights (missing trailing parts are 0)."""
    try:
        parts = [float(p) for p in str(split).replace("/", ",").split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"data.split: {split!r} must be up to three comma-separated "
                          "numbers, e.g. '969,30,1'") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise ConfigError(f"data.split: {split!r} must be up to three non-negative numbers "
                          "with a positive sum, e.g. '969,30,1'")
    parts += [0.0] * (3 - len(parts))
    total = sum(parts)
    return tuple(p / total for p in parts)  # type: ignore[return-value]


def split_document_ranges(num_documents: int, weights: tuple[float, ...]
                          ) -> list[tuple[int, int]]:
    """Contiguous, disjoint [begin, end) document ranges covering all documents."""
    bounds = np.round(np.cumsum((0.0, *weights)) * num_documents).astype(np.int64)
    bounds[-1] = num_documents
    return [(int(b), int(e)) for b, e in zip(bounds[:-1], bounds[1:], strict=True)]


class GPTDataset:
    """`num_samples` samples of `seq_len + 1` int64 tokens from documents [begin, end) of one
    indexed dataset."""

    def __init__(self, reader: IndexedReader, documents: tuple[int, int], seq_len: int,
                 num_samples: int, seed: int | list[int], cache_dir: str | Path | None = None,
                 name: str = "train") -> None:
        if seq_len < 1 or num_samples < 1:
            raise ValueError("seq_len and num_samples must be >= 1")
        self.reader = reader
        self.seq_len = seq_len
        self.name = name
        key = {"kind": "gpt", "idx": file_fingerprint(idx_path(reader.prefix)),
               "bin_tokens": reader.num_tokens, "documents": list(documents),
               "seq_len": seq_len, "num_samples": num_samples, "seed": seed}
        label = f"{Path(reader.prefix).name}-{name}"
        arrays = cached_arrays(cache_dir, label, key,
                               lambda: build_index_arrays(reader, documents, seq_len,
                                                          num_samples, seed, name))
        self.doc_start = arrays["doc_start"]
        self.doc_len = arrays["doc_len"]
        self.doc_idx = arrays["doc_idx"]
        self.sample_idx = arrays["sample_idx"]
        self.shuffle_idx = arrays["shuffle_idx"]

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        position, offset = (int(v) for v in self.sample_idx[self.shuffle_idx[i]])
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        filled = 0
        while filled < len(out):
            doc = self.doc_idx[position]
            take = min(int(self.doc_len[doc]) - offset, len(out) - filled)
            out[filled:filled + take] = self.reader.tokens(int(self.doc_start[doc]) + offset,
                                                           take)
            filled += take
            position, offset = position + 1, 0
        return out


Dataset = GPTDataset | BlendedDataset
"""What `build_gpt_datasets` returns: `len(ds)` samples, `ds[i]` int64 array of seq_len + 1."""


def build_index_arrays(reader: IndexedReader, documents: tuple[int, int], seq_len: int,
                       num_samples: int, seed: int | list[int], name: str = "train"
                       ) -> dict[str, np.ndarray]:
    """The doc / sample / shuffle index arrays of a `GPTDataset` (see the module docstring)."""
    begin, end = documents
    starts, lengths = reader.document_spans()
    keep = lengths[begin:end] > 0
    doc_start, doc_len = starts[begin:end][keep], lengths[begin:end][keep]
    tokens_per_epoch = int(doc_len.sum())
    if tokens_per_epoch < seq_len + 1:
        raise DataError(f"{reader.prefix}: the {name} split (documents {begin}..{end}) holds "
                        f"{tokens_per_epoch} tokens, fewer than one sample of seq_len + 1 = "
                        f"{seq_len + 1}; add data, change data.split or lower model.seq_len")
    needed = num_samples * seq_len + 1
    num_epochs = -(-needed // tokens_per_epoch)
    rng = np.random.default_rng(seed)
    doc_dtype = np.int32 if len(doc_len) < 2**31 else np.int64
    doc_idx = np.concatenate([rng.permutation(len(doc_len)).astype(doc_dtype)
                              for _ in range(num_epochs)])
    stream_ends = np.cumsum(doc_len[doc_idx], dtype=np.int64)
    sample_starts = np.arange(num_samples, dtype=np.int64) * seq_len
    position = np.searchsorted(stream_ends, sample_starts, side="right")
    offset = sample_starts - (stream_ends[position] - doc_len[doc_idx[position]])
    logger.info("%s: %d samples of %d tokens from %d documents (%d tokens/epoch, %d epoch(s))",
                name, num_samples, seq_len + 1, len(doc_len), tokens_per_epoch, num_epochs)
    return {
        "doc_start": doc_start,
        "doc_len": doc_len,
        "doc_idx": doc_idx,
        "sample_idx": np.stack([position, offset], axis=1),
        "shuffle_idx": rng.permutation(num_samples),
    }


def build_gpt_datasets(data_config: DataConfig, seq_len: int, seed: int,
                       num_samples: tuple[int, int, int]) -> tuple[Dataset | None, ...]:
    """Train, valid and test datasets of `num_samples` samples each (`None` where the split
    weight or the requested count is zero); several prefixes are blended by their weights
    (a plain list of prefixes is weighted by token count, as if concatenated)."""
    split = parse_split(data_config.split)
    prefixes, weights = parse_blend(data_config.prefixes)
    if not prefixes:
        raise DataError("data.prefixes is empty: give .bin/.idx prefixes (or build the default "
                        "corpus with megaloom.data.default_corpus.ensure_default_data)")
    if len(num_samples) != 3 or any(n < 0 for n in num_samples):
        raise ValueError(f"num_samples must be three non-negative counts, got {num_samples}")
    readers = [IndexedReader(p) for p in prefixes]
    ranges = [split_document_ranges(r.num_documents, split) for r in readers]
    cache = Path(data_config.cache_dir) / "index" if data_config.cache_dir else None
    datasets = []
    for s, name in enumerate(SPLIT_NAMES):
        if split[s] == 0 or num_samples[s] == 0:
            datasets.append(None)
            continue
        if len(readers) == 1:
            datasets.append(GPTDataset(readers[0], ranges[0][s], seq_len, num_samples[s],
                                       [seed, s], cache, name))
            continue
        if weights is None:  # plain list: weight by tokens, as if concatenated
            split_weights = [_tokens_in(r, rr[s]) for r, rr in zip(readers, ranges, strict=True)]
        else:
            split_weights = weights
        counts = blend_counts(split_weights, num_samples[s])
        parts = [GPTDataset(r, rr[s], seq_len, int(n), [seed, s, k], cache, name) if n else None
                 for k, (r, rr, n) in enumerate(zip(readers, ranges, counts, strict=True))]
        datasets.append(BlendedDataset(parts, counts, cache, name))
    return tuple(datasets)


def _tokens_in(reader: IndexedReader, documents: tuple[int, int]) -> int:
    return int(reader.document_spans()[1][documents[0]:documents[1]].sum())
