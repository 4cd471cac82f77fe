"""Cloze objectives on token windows, for the encoder families (issue: BERT and T5): BERT's
masked-LM masker and T5's span corruption, pure functions of (tokens, generator).

A dataset draws each sample's generator from `sample_rng(seed, index)`, so the masking of
sample `index` never depends on what was drawn before it: resume, any data-parallel split
and any number of loader workers see the same masks.

- `mask_for_mlm` (Devlin et al. 2019; Megatron's n-gram and whole-word options): choose
  `round(rate x candidates)` positions (at least one) as whole units (a token, or a word: a
  token starting a word and the continuation tokens after it), as n-grams of units with
  `P(n) ~ 1/n` up to `max_ngram`; replace 80% by the mask token, 10% by a random token, keep
  10%. Labels hold the original token at every chosen position and `IGNORE` elsewhere.
- `corrupt_spans` (Raffel et al. 2020): `round(density x length)` noise tokens in
  `round(noise / mean_span)` spans, span and gap lengths drawn as random compositions (T5's
  `random_spans_noise_mask`); the input keeps the gaps with one sentinel per span, the
  target lists each sentinel followed by its span.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megaloom.errors import DataError

IGNORE = -100  # label of positions the loss skips (PyTorch's cross-entropy default)
SENTINEL = "<extra_id_{}>"
BERT_TOKENS = ("[CLS]", "[SEP]", "[MASK]")  # the masked-LM task's default framing and mask


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of sample `index` of a run seeded `seed`."""
    return np.random.default_rng([seed, index])


@dataclass(frozen=True)
class MLMMasking:
    """BERT masking: `rate` of the candidate positions, split `mask`/`random`/keep."""

    rate: float = 0.15
    mask: float = 0.8
    random: float = 0.1
    max_ngram: int = 1
    whole_word: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.rate < 1:
            raise DataError(f"masking rate must be in (0, 1), got {self.rate}")
        if self.mask < 0 or self.random < 0 or self.mask + self.random > 1:
            raise DataError(f"mask ({self.mask}) and random ({self.random}) replacement "
                            "fractions must be >= 0 and sum to at most 1")
        if self.max_ngram < 1:
            raise DataError(f"max_ngram must be >= 1, got {self.max_ngram}")


def _units(candidates: np.ndarray, word_start: np.ndarray | None) -> list[np.ndarray]:
    """Candidate positions grouped into masking units: single tokens, or whole words."""
    if word_start is None:
        return [candidates[i:i + 1] for i in range(len(candidates))]
    units: list[list[int]] = []
    for position in candidates:
        if not units or word_start[position] or position != units[-1][-1] + 1:
            units.append([int(position)])
        else:
            units[-1].append(int(position))
    return [np.asarray(u) for u in units]


def mask_for_mlm(tokens: np.ndarray, rng: np.random.Generator, config: MLMMasking,
                 mask_id: int, vocab_size: int, special: Sequence[int] = (),
                 word_start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(masked input, labels) of one token window. `special` ids are never chosen nor drawn
    as random replacements; `word_start[id]` says whether token `id` begins a word (needed
    for `whole_word`)."""
    if config.whole_word and word_start is None:
        raise DataError("whole-word masking needs the tokenizer's word-start table")
    tokens = np.asarray(tokens, dtype=np.int64)
    candidates = np.flatnonzero(~np.isin(tokens, np.asarray(special, dtype=np.int64)))
    if not len(candidates):
        raise DataError("a window with only special tokens has nothing to mask")
    units = _units(candidates, word_start[tokens] if config.whole_word else None)
    budget = max(1, round(config.rate * len(candidates)))
    lengths = np.arange(1, config.max_ngram + 1)
    weights = (1.0 / lengths) / (1.0 / lengths).sum()
    chosen = np.zeros(len(tokens), dtype=bool)
    count = 0
    for start in rng.permutation(len(units)):
        if count >= budget:
            break
        n = int(rng.choice(lengths, p=weights)) if config.max_ngram > 1 else 1
        span = np.concatenate(units[start:start + n])
        while count + len(span) > budget and n > 1:  # shrink an n-gram that overshoots
            n -= 1
            span = np.concatenate(units[start:start + n])
        if chosen[span].any() or (count and count + len(span) > budget):
            continue  # overlaps, or a whole word too long for what is left
        chosen[span] = True
        count += len(span)
    positions = np.flatnonzero(chosen)
    labels = np.full(len(tokens), IGNORE, dtype=np.int64)
    labels[positions] = tokens[positions]
    inputs = tokens.copy()
    draw = rng.random(len(positions))
    masked = positions[draw < config.mask]
    randomised = positions[(draw >= config.mask) & (draw < config.mask + config.random)]
    inputs[masked] = mask_id
    pool = np.setdiff1d(np.arange(vocab_size), np.asarray([*special, mask_id]))
    inputs[randomised] = rng.choice(pool, size=len(randomised))
    return inputs, labels


def _composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` split into `parts` positive integers, uniformly over such splits."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(length: int, rng: np.random.Generator, density: float = 0.15,
               mean_span: float = 3.0) -> np.ndarray:
    """Boolean noise mask of `length` tokens: T5's spans, starting with a gap."""
    if length < 2:
        raise DataError(f"span corruption needs windows of at least 2 tokens, got {length}")
    noise = min(max(round(length * density), 1), length - 1)
    spans = max(round(noise / mean_span), 1)
    spans = min(spans, noise, length - noise)
    noise_lengths = _composition(noise, spans, rng)
    gap_lengths = _composition(length - noise, spans, rng)
    mask = np.zeros(length, dtype=bool)
    position = 0
    for gap, span in zip(gap_lengths, noise_lengths, strict=True):
        position += gap
        mask[position:position + span] = True
        position += span
    return mask


def corrupt_spans(tokens: np.ndarray, rng: np.random.Generator, sentinels: Sequence[int],
                  density: float = 0.15, mean_span: float = 3.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(encoder input, decoder target) of one window: each noise span becomes the next
    sentinel in the input; the target is each sentinel followed by the span it hides (the
    dataset appends EOS to both, as T5 does)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    mask = noise_mask(len(tokens), rng, density, mean_span)
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    if len(starts) > len(sentinels):
        raise DataError(f"{len(starts)} noise spans but only {len(sentinels)} sentinel tokens")
    inputs: list[int] = []
    targets: list[int] = []
    span_of = {int(start): i for i, start in enumerate(starts)}
    for position, token in enumerate(tokens.tolist()):
        if not mask[position]:
            inputs.append(token)
            continue
        if position in span_of:
            inputs.append(sentinels[span_of[position]])
            targets.append(sentinels[span_of[position]])
        targets.append(token)
    return np.asarray(inputs, dtype=np.int64), np.asarray(targets, dtype=np.int64)


def word_starts(tokenizer) -> np.ndarray:
    """Whether each id of a byte-level BPE tokenizer begins a word: its text starts with a
    space or newline (`Ġ`, `Ċ`), or it is a special token."""
    vocab = tokenizer.hf.get_vocab(with_added_tokens=True)
    special = {t.content for t in tokenizer.hf.get_added_tokens_decoder().values()}
    starts = np.zeros(tokenizer.vocab_size, dtype=bool)
    for token, index in vocab.items():
        starts[index] = token.startswith(("\u0120", "\u010a")) or token in special
    return starts


def sentinel_ids(tokenizer, count: int) -> list[int]:
    """The ids of `<extra_id_0>` .. `<extra_id_{count-1}>`; an error naming the first missing."""
    ids = []
    for i in range(count):
        token = SENTINEL.format(i)
        found = tokenizer.token_to_id(token)
        if found is None:
            raise DataError(f"the tokenizer has no sentinel token {token} (T5 span corruption "
                            f"needs {count}); train one with `megaloom tokenizer train "
                            f"--sentinels {count}`")
        ids.append(found)
    return ids
