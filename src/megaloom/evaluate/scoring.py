"""Log-likelihood scoring: the one forward loop behind perplexity, cloze and multiple choice.

A `Window` is a token sequence and how many of its trailing tokens are scored: token `t[i+1]`
is predicted from `t[:i+1]`, so a window of n tokens runs a forward over `t[:-1]` and scores
targets `t[-scored:]`. `Scorer.score` batches windows longest first, pads on the right (plain
causal attention is then exact for every real position), runs forward passes only
(`torch.inference_mode`, no autograd graph, no optimizer state), and applies the final norm
and head only to the positions that hold a scored target (`keep_last`), which is most of the
saving over a forward that computes logits everywhere. Log-softmax is taken in fp32 over the
real vocabulary (padding columns never count). With a tensor-parallel model
(`FullLogitsGPT`) every rank computes the same scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


@dataclass(frozen=True)
class Window:
    tokens: Sequence[int]
    scored: int

    def __post_init__(self) -> None:
        if not 1 <= self.scored < len(self.tokens):
            raise ValueError(f"a window of {len(self.tokens)} tokens cannot score "
                             f"{self.scored} targets")


@dataclass(frozen=True)
class Scored:
    """Per-target log-probabilities of one window, and whether every target was the argmax."""

    logprobs: list[float]
    greedy: bool

    @property
    def total(self) -> float:
        return math.fsum(self.logprobs)


class Scorer:
    """Scores windows with `model` (token ids -> padded-vocabulary logits); `batch_size`
    windows per forward, each at most `max_tokens` long (the model's `seq_len` + 1). A
    progress bar shows on a terminal when `progress` (rank 0 of a tensor-parallel job)."""

    def __init__(self, model: nn.Module, vocab_size: int, max_tokens: int,
                 batch_size: int = 8, device: torch.device | str = "cpu",
                 progress: bool = True):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model.eval()
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress
        self.tokens_scored = 0

    def score(self, windows: Sequence[Window], desc: str = "score") -> list[Scored]:
        """One `Scored` per window, in the order given."""
        for window in windows:
            if len(window.tokens) > self.max_tokens:
                raise ValueError(f"a window of {len(window.tokens)} tokens is longer than the "
                                 f"model's {self.max_tokens - 1}-token context + 1")
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i].tokens))
        results: list[Scored | None] = [None] * len(windows)
        with tqdm(total=len(windows), desc=desc, unit="seq",
                  disable=None if self.progress else True) as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                for index, scored in zip(chunk, self._batch([windows[i] for i in chunk]),
                                         strict=True):
                    results[index] = scored
                bar.update(len(chunk))
        self.tokens_scored += sum(w.scored for w in windows)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _batch(self, windows: list[Window]) -> list[Scored]:
        width = max(len(w.tokens) for w in windows) - 1
        inputs = torch.zeros(len(windows), width, dtype=torch.long)
        for row, window in enumerate(windows):
            inputs[row, :len(window.tokens) - 1] = torch.as_tensor(window.tokens[:-1])
        # scored targets of row r sit at input positions [len_r - 1 - scored_r, len_r - 1)
        first = min(len(w.tokens) - 1 - w.scored for w in windows)
        keep = width - first
        logits = self.model(inputs.to(self.device), keep_last=keep)
        out = []
        for row, window in enumerate(windows):
            begin = len(window.tokens) - 1 - window.scored - first
            rows = logits[row, begin:begin + window.scored, :self.vocab_size].float()
            targets = torch.as_tensor(window.tokens[-window.scored:], device=rows.device)
            chosen = -F.cross_entropy(rows, targets, reduction="none")  # fused log-softmax
            greedy = bool((rows.argmax(-1) == targets).all())
            out.append(Scored(chosen.tolist(), greedy))
        return out
