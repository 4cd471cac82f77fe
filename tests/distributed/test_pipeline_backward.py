"""A stage's backward from the gradient the next stage sent equals PyTorch's `grad_tensors`
backward bit for bit."""

import torch

from megaloom.config import ModelConfig
from megaloom.model import GPT
from megaloom.parallel.pipeline import backward_stage


def _stage_gradients(backward) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(ModelConfig(num_layers=2, hidden_size=32, num_heads=4, vocab_size=64,
                            seq_len=8))
    output = model(torch.randint(0, 64, (2, 8)))
    grad_output = torch.randn_like(output) * 1e3
    backward(output, grad_output)
    return [p.grad for p in model.parameters()]


def test_backward_stage_equals_backward_with_grad_tensors_bit_for_bit():
    ours = _stage_gradients(backward_stage)
    reference = _stage_gradients(lambda out, grad: torch.autograd.backward(out, grad))
    assert len(ours) == len(reference) > 10
    for mine, theirs in zip(ours, reference, strict=True):
        assert torch.equal(mine, theirs)


def test_backward_stage_on_the_loss_needs_no_gradient():
    weight = torch.tensor([1.5, -2.0], requires_grad=True)
    backward_stage((weight * weight).sum(), None)
    assert torch.equal(weight.grad, 2 * weight.detach())
