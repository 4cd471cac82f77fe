"""Sampling maths against closed-form references on small logits vectors."""

from __future__ import annotations

import math

import pytest
import torch

from megaloom.infer.params import SamplingParams
from megaloom.infer.sampling import BatchSampler, penalize


def test_penalties_match_hand_computed_reference():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    penalize(logits, params, prompt_ids=[0], output_ids=[3, 3, 1])
    # repetition on seen {0, 1, 3}: 2/2, -1*2, 3/2; then token 3 (count 2) loses 2*0.5+0.25,
    # token 1 (count 1) loses 0.5+0.25; token 0 is prompt-only so only repetition applies.
    assert logits.tolist() == pytest.approx([1.0, -2.75, 0.5, 0.25, -2.0])


def test_no_penalties_leave_logits_alone():
    logits = torch.tensor([0.1, 0.2, 0.3])
    penalize(logits, SamplingParams(), [0, 1], [2, 2])
    assert logits.tolist() == pytest.approx([0.1, 0.2, 0.3])


def sample_many(logits: torch.Tensor, params: SamplingParams, rows: int = 4000) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(i) for i in range(rows)]
    sampler = BatchSampler([params] * rows, gens, logits.shape[-1], torch.device("cpu"))
    return torch.tensor(sampler.sample(logits.expand(rows, -1), [[]] * rows, [[]] * rows).tokens)


PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def test_temperature_sampling_follows_the_softmax():
    logits = PROBS.log()
    tokens = sample_many(logits, SamplingParams(temperature=0.8))
    expected = torch.softmax(logits / 0.8, dim=-1)
    observed = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert observed.tolist() == pytest.approx(expected.tolist(), abs=0.03)


@pytest.mark.parametrize(("params", "allowed"), [
    (SamplingParams(top_k=2), {0, 1}),
    (SamplingParams(top_p=0.7), {0, 1}),
    (SamplingParams(top_p=0.45), {0}),
    (SamplingParams(top_p=0.9, top_k=3), {0, 1, 2}),
])
def test_top_k_and_top_p_keep_only_the_nucleus(params, allowed):
    tokens = sample_many(PROBS.log(), params, rows=600)
    assert set(tokens.tolist()) == allowed
    if allowed == {0, 1}:  # renormalised over the kept tokens: 0.5/0.8 and 0.3/0.8
        share = (tokens == 0).float().mean().item()
        assert share == pytest.approx(0.625, abs=0.06)


def test_padding_ids_are_never_sampled():
    logits = torch.zeros(1, 8)
    logits[0, 5:] = 100.0  # columns 5.. are vocabulary padding
    for params in (SamplingParams(temperature=0.0), SamplingParams(seed=1)):
        sampler = BatchSampler([params], [torch.Generator().manual_seed(0)], 5,
                               torch.device("cpu"))
        for _ in range(20):
            assert sampler.sample(logits, [[]], [[]]).tokens[0] < 5


def test_logprobs_are_the_raw_model_distribution():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    params = SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=3.0)
    sampler = BatchSampler([params], [None], 3, torch.device("cpu"))
    step = sampler.sample(logits, [[2]], [[]])
    norm = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    # the penalty turns 3.0 into 1.0, so greedy picks token 1; logprobs stay unpenalised
    assert step.tokens == [1]
    assert step.logprobs[0] == pytest.approx(2.0 - norm)
    assert [t for t, _ in step.top_logprobs[0]] == [2, 1]


def reference_kept(probs: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """The textbook filter: sort, cut at rank k, renormalise, keep while the mass before a
    token is below top_p."""
    values, order = probs.sort(descending=True)
    if top_k:
        values = values[:top_k]
    if top_p >= 1.0:
        return set(order[: len(values)].tolist())
    values = values / values.sum()
    mass_before = values.cumsum(0) - values
    return set(order[: int((mass_before < top_p).sum())].tolist())


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_keep_floor_matches_the_sorted_reference(temperature):
    gen = torch.Generator().manual_seed(3)
    settings = [(0, 0.9), (5, 1.0), (40, 0.5), (0, 0.05), (1, 1.0), (0, 1.0), (300, 0.99)]
    params = [SamplingParams(temperature=temperature, top_k=k, top_p=p) for k, p in settings]
    sampler = BatchSampler(params, [None] * len(params), 1000, torch.device("cpu"))
    logits = torch.randn(len(params), 1000, generator=gen) * 3
    probs = torch.softmax(logits / temperature, dim=-1)
    kept = probs >= sampler._keep_floor(probs)
    for row, (k, p) in enumerate(settings):
        assert set(kept[row].nonzero()[:, 0].tolist()) == reference_kept(probs[row], k, p)
