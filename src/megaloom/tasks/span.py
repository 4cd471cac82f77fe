"""T5 pretraining (`task.name=span`): span corruption on the `.bin`/`.idx` token windows.

`SpanCorruptionDataset` turns window `i` into (encoder input, decoder target) with
`data.masking.corrupt_spans`, an end-of-text token closing both, as T5 does. The window length
is the longest whose corrupted input fits `model.seq_len` (`window_length`: the noise and span
counts are fixed functions of the length, so every sample has the same input and target
lengths; T5's `compute_input_and_target_lengths` does the same). The masking of sample `i`
is a pure function of (seed, split, i), so resume and every data-parallel split see the same
spans.

`SpanCorruptionTask` is teacher forcing: the decoder reads `[start] + target[:-1]` and the loss
is the summed vocab-parallel cross-entropy over the target tokens; the trainer divides it by
the global target-token count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megaloom.config import ConfigError, SpanCorruptionConfig
from megaloom.data.masking import corrupt_spans, noise_mask, sample_rng, sentinel_ids
from megaloom.data.tokenizer import Tokenizer
from megaloom.parallel.loss import parallel_lm_loss
from megaloom.parallel.topology import Axis
from megaloom.tasks.base import stack


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


class SpanCorruptionTask:
    """Teacher-forced decoder loss of an encoder-decoder on (source, target) samples: span
    corruption, and any text-to-text data with the same sample keys (`tokens`, `keep`,
    `target`; `target_mask` when targets are padded). Targets are padded to a multiple of
    `multiple` (the tp size under sequence parallelism)."""

    name = "span"

    def __init__(self, vocab_size: int, decoder_start_id: int, multiple: int = 1):
        self.vocab_size, self.start, self.multiple = vocab_size, decoder_start_id, multiple

    def batch(self, samples: Sequence[dict[str, np.ndarray]], device: torch.device
              ) -> dict[str, torch.Tensor]:
        target = stack(samples, "target", device)
        mask = (stack(samples, "target_mask", device, torch.float32)
                if "target_mask" in samples[0] else torch.ones(target.shape, device=device))
        padding = -target.shape[1] % self.multiple
        if padding:
            target = torch.nn.functional.pad(target, (0, padding))
            mask = torch.nn.functional.pad(mask, (0, padding))
        decoder = torch.cat([torch.full_like(target[:, :1], self.start), target[:, :-1]], dim=1)
        return {"tokens": stack(samples, "tokens", device),
                "attn_mask": stack(samples, "keep", device, torch.bool),
                "decoder_tokens": decoder, "targets": target, "loss_mask": mask}

    def loss_sum(self, output: torch.Tensor, batch: dict[str, torch.Tensor], axis: Axis
                 ) -> torch.Tensor:
        return parallel_lm_loss(output, batch["targets"], axis, self.vocab_size,
                                batch["loss_mask"])

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["loss_mask"].sum().item())
