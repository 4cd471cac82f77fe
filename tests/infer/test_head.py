"""The engine's output heads compute what the model's own `lm_head` computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megaloom.infer import Engine, SamplingError
from megaloom.infer.head import (
    LogitsHead,
    PackedHead,
    packing_supported,
    row_argmax,
    screening_supported,
)
from megaloom.utils.device import native_bf16

VOCAB = 1000

needs_bf16 = pytest.mark.skipif(not screening_supported(torch.zeros(1)),
                                reason="the CPU has no native bf16 for the greedy screen")


def head_and_hidden(rows: int, seed: int = 0, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(96, VOCAB + 24, bias=False)  # padded vocabulary
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.05)
    hidden = torch.randn(rows, 96, generator=gen) * scale
    return linear, hidden


@pytest.mark.parametrize("rows", [1, 3, 8, 33])
def test_packed_logits_equal_linear(rows):
    linear, hidden = head_and_hidden(rows)
    head = PackedHead(linear, VOCAB, rows_hint=8)
    torch.testing.assert_close(head.logits(hidden[:, None]),
                               F.linear(hidden, linear.weight)[:, None, :VOCAB],
                               rtol=1e-5, atol=1e-5)


@needs_bf16
@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_screened_greedy_equals_fp32_argmax(scale):
    """Many random rows, including near-ties planted just above the bf16 resolution."""
    linear, hidden = head_and_hidden(64, seed=1, scale=scale)
    reference = F.linear(hidden.double(), linear.weight.double())[:, :VOCAB]
    best = reference.argmax(-1)
    with torch.no_grad():  # give rows 0..31 a rival token within ~1e-4 of the best
        for row in range(32):
            rival = (int(best[row]) + 7) % VOCAB
            linear.weight[rival] = linear.weight[best[row]] * (1 - 1e-4 * (row % 2 * 2 - 1))
    reference = F.linear(hidden.double(), linear.weight.double())[:, :VOCAB]
    head = PackedHead(linear, VOCAB, rows_hint=8, screen=True)
    assert torch.equal(head.greedy(hidden), reference.argmax(-1))


@needs_bf16
def test_screened_greedy_falls_back_on_non_finite_rows():
    linear, hidden = head_and_hidden(3)
    hidden[1, 5] = float("nan")
    hidden[2, 7] = float("inf")
    head = PackedHead(linear, VOCAB, rows_hint=4, screen=True)
    expected = row_argmax(F.linear(hidden, linear.weight)[:, :VOCAB])
    assert torch.equal(head.greedy(hidden), expected)


def test_engine_refuses_packing_where_unsupported(make_model):
    model = make_model("gpt2").double()
    assert not packing_supported(model.lm_head.weight)
    with pytest.raises(SamplingError, match="packed_head"):
        Engine(model, packed_head=True)
    assert Engine(model).model is model  # the default falls back to the plain head


def test_row_argmax_equals_torch_argmax():
    torch.manual_seed(0)
    logits = torch.randn(5, 1000)[:, :997]  # a strided view, as the engine passes
    logits[1, 10] = logits[1, 500] = 50.0  # a tie: the first index wins
    logits[2, 7] = float("nan")  # NaN counts as the largest
    logits[3] = float("-inf")
    assert torch.equal(row_argmax(logits), logits.argmax(dim=-1))


def test_bf16_models_get_the_packed_head_where_the_cpu_has_bf16_kernels(make_model):
    """A bf16 model gets packed bf16 logits where oneDNN has bf16 kernels (no screen: they
    already are the model's own); elsewhere the plain head, and asking for packing fails."""
    model = make_model("llama").to(torch.bfloat16)
    engine = Engine(model, max_batch_size=2)
    if not native_bf16():
        assert isinstance(engine.head, LogitsHead)
        with pytest.raises(SamplingError, match="packed_head"):
            Engine(model, packed_head=True)
        return
    assert isinstance(engine.head, PackedHead) and engine.head.screen is None
    hidden = torch.randn(3, model.config.hidden_size, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model.lm_head(hidden)[:, : model.config.vocab_size]
    torch.testing.assert_close(engine.head.logits(hidden), expected, rtol=2e-2, atol=2e-2)
