"""Weighted blending of several datasets into one, with exact per-dataset sample counts.

`parse_blend` reads `data.prefixes` (Megatron's `[w1, p1, w2, p2, ...]` or a plain list of
prefixes). `blend_counts` turns weights into integer sample counts that sum to the total
(largest-remainder rounding: each count is within one of its exact share). `BlendedDataset`
interleaves the datasets evenly: dataset i's k-th sample sits at "time" (k + 0.5) / count_i and
samples are ordered by time, so any prefix of the blend follows the weights closely too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megaloom.config import ConfigError
from megaloom.data.index_cache import cached_arrays


def parse_blend(items: Sequence[Any]) -> tuple[list[str], list[float] | None]:
    """Split `data.prefixes` into prefixes and weights (None for a plain list)."""
    items = list(items)
    if all(isinstance(x, (str, Path)) for x in items):
        return [_strip_suffix(str(x)) for x in items], None
    pairs = list(zip(items[::2], items[1::2], strict=False))
    valid = len(items) % 2 == 0 and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and isinstance(p, (str, Path))
        for w, p in pairs)
    if not valid:
        raise ConfigError("data.prefixes: expected a list of prefixes or alternating weights "
                          f"and prefixes like [0.3, data/a, 0.7, data/b], got {items!r}")
    weights = [float(w) for w, _ in pairs]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"data.prefixes: weights must be >= 0 with a positive sum: {weights}")
    return [_strip_suffix(str(p)) for _, p in pairs], weights


def _strip_suffix(prefix: str) -> str:
    """Accept `data/x_text_document.bin` or `.idx` for the prefix `data/x_text_document`."""
    return prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix


def blend_counts(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer counts proportional to `weights` summing to `total` (largest remainder; ties go
    to the earlier dataset)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    remainder = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:remainder]] += 1
    return counts


def blend_order(counts: Sequence[int]) -> dict[str, np.ndarray]:
    """`dataset_index[i]`, `sample_index[i]`: which dataset and which of its samples is i."""
    dataset = np.concatenate([np.full(n, d, dtype=np.int16) for d, n in enumerate(counts)])
    sample = np.concatenate([np.arange(n, dtype=np.int64) for n in counts])
    times = (sample + 0.5) / np.asarray(counts, dtype=np.float64)[dataset]
    order = np.lexsort((dataset, times))
    return {"dataset_index": dataset[order], "sample_index": sample[order]}


class BlendedDataset:
    """Samples of several datasets interleaved; `parts[i]` provides `counts[i]` of them (a part
    with count 0 may be None)."""

    def __init__(self, parts: Sequence[Any], counts: Sequence[int],
                 cache_dir: str | Path | None = None, name: str = "train") -> None:
        for part, n in zip(parts, counts, strict=True):
            if n and (part is None or len(part) < n):
                raise ValueError("each blended dataset must hold at least its sample count")
        self.parts = list(parts)
        self.counts = [int(n) for n in counts]
        arrays = cached_arrays(cache_dir, f"blend-{name}", {"kind": "blend", "counts": self.counts},
                               lambda: blend_order(self.counts))
        self.dataset_index = arrays["dataset_index"]
        self.sample_index = arrays["sample_index"]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.parts[int(self.dataset_index[i])][int(self.sample_index[i])]
