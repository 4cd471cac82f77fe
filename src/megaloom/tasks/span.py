"""T5 pretraining (`task.name=span`): span corruption on the `.bin`/`.idx` token windows.

`SpanCorruptionDataset` turns window `i` into (encoder input, decoder target) with
`data.masking.corrupt_spans`, an end-of-text token closing both, as T5 does. The window length
is the longest whose corrupted input fits `model.seq_len` (`window_length`: the noise and span
counts are fixed functions of the length, so every sample has the same input and target
lengths; T5's `compute_input_and_target_lengths` does the same). The masking of sample `i`
is a pure function of (seed, split, i), so resume and every data-parallel split see the same
spans.

Its loss is `tasks.text_to_text.TextToTextTask`'s (teacher forcing over the target).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megaloom.config import ConfigError, SpanCorruptionConfig
from megaloom.data.masking import corrupt_spans, noise_mask, sample_rng, sentinel_ids
from megaloom.data.tokenizer import Tokenizer


def corrupted_lengths(window: int, cfg: SpanCorruptionConfig) -> tuple[int, int, int]:
    """(encoder input, decoder target, spans) lengths of a `window`-token sample, each with
    its end-of-text token."""
    mask = noise_mask(window, np.random.default_rng(0), cfg.density, cfg.mean_span)
    noise = int(mask.sum())
    spans = int((mask & ~np.concatenate([[False], mask[:-1]])).sum())
    return window - noise + spans + 1, noise + spans + 1, spans


def window_length(seq_len: int, cfg: SpanCorruptionConfig) -> int:
    """The longest window whose corrupted input (with its end token) fits `seq_len`: longer
    than `seq_len`, since each span shrinks to one sentinel."""
    fits = [w for w in range(2, 2 * seq_len + 2) if corrupted_lengths(w, cfg)[0] <= seq_len]
    if not fits:
        raise ConfigError(f"model.seq_len={seq_len} is too short for span corruption")
    return max(fits)


class SpanCorruptionDataset(Sequence):
    """`windows[i]` (int arrays of `window_length` tokens) as span-corrupted T5 samples."""

    def __init__(self, windows: Sequence[np.ndarray], tokenizer: Tokenizer,
                 cfg: SpanCorruptionConfig, seed: int, seq_len: int):
        self.windows, self.cfg, self.seed, self.seq_len = windows, cfg, seed, seq_len
        self.eod = tokenizer.eod_id
        window = len(windows[0]) if len(windows) else window_length(seq_len, cfg)
        spans = corrupted_lengths(window, cfg)[2]
        if spans > cfg.sentinels:
            raise ConfigError(f"task.span.sentinels={cfg.sentinels} is fewer than the {spans} "
                              f"spans of a {window}-token window")
        self.sentinels = sentinel_ids(tokenizer, spans)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        window = np.asarray(self.windows[index], dtype=np.int64)
        inputs, target = corrupt_spans(window, sample_rng(self.seed, int(index)), self.sentinels,
                                       self.cfg.density, self.cfg.mean_span)
        inputs = np.concatenate([inputs, [self.eod]])
        keep = np.zeros(self.seq_len, dtype=bool)
        keep[:len(inputs)] = True
        padded = np.full(self.seq_len, self.eod, dtype=np.int64)
        padded[:len(inputs)] = inputs
        return {"tokens": padded, "keep": keep, "target": np.concatenate([target, [self.eod]])}
