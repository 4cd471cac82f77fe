"""BERT masking and T5 span corruption, by their properties over many seeded samples: the
number of chosen positions, the 80/10/10 split (binomial bounds), whole words and n-grams,
recovery of every original token from input and labels/target, span-length mean, sentinels,
determinism by (seed, index); and the tokenizer's sentinel and mask tokens."""

import json

import numpy as np
import pytest

from megaloom.cli import main
from megaloom.data.masking import (
    IGNORE,
    MLMMasking,
    corrupt_spans,
    mask_for_mlm,
    noise_mask,
    sample_rng,
    sentinel_ids,
    word_starts,
)
from megaloom.data.tokenizer import Tokenizer
from megaloom.errors import DataError

VOCAB, MASK, SPECIAL = 500, 3, (0, 1, 2, 3)


def window(index, length=128):
    return sample_rng(99, index).integers(len(SPECIAL), VOCAB, size=length)


def within(observed, total, p, sigmas=5.0):
    return abs(observed - total * p) <= sigmas * np.sqrt(total * p * (1 - p))


def test_bert_masking_rate_split_and_recovery():
    config = MLMMasking()
    chosen = masked = randomised = kept = 0
    for index in range(400):
        tokens = window(index)
        tokens[0] = 0  # a special token is never chosen
        inputs, labels = mask_for_mlm(tokens, sample_rng(7, index), config, MASK, VOCAB,
                                      SPECIAL)
        picked = labels != IGNORE
        assert picked.sum() == round(0.15 * 127) and not picked[0]
        assert np.array_equal(np.where(picked, labels, inputs), tokens)  # recoverable
        assert np.array_equal(inputs[~picked], tokens[~picked])
        assert not np.isin(inputs[picked & (inputs != MASK)], [0, 1, 2]).any()
        chosen += picked.sum()
        masked += (inputs[picked] == MASK).sum()
        same = inputs[picked] == tokens[picked]
        kept += same.sum()
        randomised += (~same & (inputs[picked] != MASK)).sum()
    # a random replacement equal to the original (p = 1/496) counts as kept
    assert within(masked, chosen, 0.8) and within(randomised, chosen, 0.1 * 495 / 496)
    assert within(kept, chosen, 0.1 + 0.1 / 496)


def test_masking_is_a_function_of_seed_and_index():
    config = MLMMasking(max_ngram=3)
    first = mask_for_mlm(window(5), sample_rng(1, 5), config, MASK, VOCAB, SPECIAL)
    again = mask_for_mlm(window(5), sample_rng(1, 5), config, MASK, VOCAB, SPECIAL)
    other = mask_for_mlm(window(5), sample_rng(1, 6), config, MASK, VOCAB, SPECIAL)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[1], other[1])


def test_whole_words_and_ngrams_are_masked_together():
    starts = np.zeros(VOCAB, dtype=bool)
    starts[::3] = True  # ids divisible by 3 begin a word
    config = MLMMasking(whole_word=True, max_ngram=3)
    lengths = []
    for index in range(200):
        tokens = window(index)
        _, labels = mask_for_mlm(tokens, sample_rng(2, index), config, MASK, VOCAB, SPECIAL,
                                 starts)
        picked = labels != IGNORE
        word_id = np.cumsum(starts[tokens] | (np.arange(len(tokens)) == 0))
        for word in np.unique(word_id[picked]):
            assert picked[word_id == word].all(), "a word was masked only in part"
        assert picked.sum() <= round(0.15 * 128)
        runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], picked, [0]]))))[::2]
        lengths += list(runs)
    assert max(lengths) > 3  # n-grams of words: runs longer than one word


def test_span_corruption_density_span_mean_and_recovery():
    sentinels = list(range(VOCAB - 1, VOCAB - 101, -1))
    noise_fraction, spans = [], []
    for index in range(300):
        tokens = window(index, 512) % 396 + 4  # below the sentinel ids
        mask = noise_mask(512, sample_rng(3, index))
        assert mask.sum() == round(0.15 * 512) and not mask[0]
        starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
        ends = np.flatnonzero(mask & ~np.concatenate([mask[1:], [False]]))
        spans += list(ends - starts + 1)
        noise_fraction.append(mask.mean())
        inputs, targets = corrupt_spans(tokens, sample_rng(3, index), sentinels)
        assert len(inputs) == 512 - mask.sum() + len(starts)
        assert len(targets) == mask.sum() + len(starts)
        restored: list[int] = []  # each sentinel in the input gives back its span
        pieces = {}
        current = None
        for token in targets.tolist():
            if token in sentinels:
                current = token
                pieces[current] = []
            else:
                pieces[current].append(token)
        for token in inputs.tolist():
            restored += pieces.get(token, [token])
        assert restored == tokens.tolist()
        assert [t for t in inputs.tolist() if t in sentinels] == sentinels[:len(starts)]
    assert abs(np.mean(spans) - 3.0) < 0.15 and np.mean(noise_fraction) == round(0.15 * 512) / 512


def test_bad_masking_inputs_are_clear():
    with pytest.raises(DataError, match="masking rate"):
        MLMMasking(rate=1.5)
    with pytest.raises(DataError, match="sum to at most 1"):
        MLMMasking(mask=0.95, random=0.1)
    with pytest.raises(DataError, match="only special tokens"):
        mask_for_mlm(np.array([0, 1, 2]), sample_rng(0, 0), MLMMasking(), MASK, VOCAB, SPECIAL)
    with pytest.raises(DataError, match="word-start table"):
        mask_for_mlm(window(0), sample_rng(0, 0), MLMMasking(whole_word=True), MASK, VOCAB)
    with pytest.raises(DataError, match="noise spans but only 2 sentinel"):
        corrupt_spans(window(0, 512), sample_rng(0, 0), [498, 499])


def test_tokenizer_with_sentinels_and_a_mask_token(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"word{i % 7} and more words"}) + "\n"
                              for i in range(50)))
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "400", "--output",
                 str(out), "--sentinels", "4", "--mask-token", "<mask>"]) == 0
    tokenizer = Tokenizer.from_file(out)
    assert sentinel_ids(tokenizer, 4) == [2, 3, 4, 5] and tokenizer.token_to_id("<mask>") == 1
    with pytest.raises(DataError, match="no sentinel token <extra_id_4>.*--sentinels 5"):
        sentinel_ids(tokenizer, 5)
    starts = word_starts(tokenizer)
    ids = tokenizer.encode("word3 and more")
    assert [bool(starts[i]) for i in ids][1:] == [
        tokenizer.hf.id_to_token(i).startswith("\u0120") for i in ids[1:]]
    assert starts[tokenizer.token_to_id("<mask>")]
