import math

import pytest
import torch

from megaloom.config import ModelConfig, TrainConfig
from megaloom.model import GPT
from megaloom.parallel.data_parallel import ParallelOptimizer
from megaloom.parallel.topology import Topology
from megaloom.train.optim import FusedAdamW, parameter_groups
from megaloom.train.precision import DynamicLossScaler
from megaloom.train.schedule import learning_rate


def test_warmup_then_cosine_to_min():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, lr_decay="cosine")
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    for step in (10, 35, 60, 85, 110):
        progress = (step - 10) / 100
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert learning_rate(step, cfg) == pytest.approx(expected)
    assert learning_rate(500, cfg) == pytest.approx(0.1)


def test_linear_and_constant_decay():
    linear = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=100, lr_decay="linear")
    assert [learning_rate(s, linear) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    const = TrainConfig(lr=0.5, min_lr=0.0, warmup_steps=4, lr_decay="constant")
    assert learning_rate(1, const) == pytest.approx(0.25)
    assert learning_rate(1000, const) == pytest.approx(0.5)


def test_no_weight_decay_on_biases_norms_embeddings():
    model = GPT(ModelConfig(arch="llama", num_layers=1, hidden_size=32, num_heads=4,
                            vocab_size=64, seq_len=8))
    groups = parameter_groups(model, 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.embed.weight) in no_decay_ids
    assert id(model.final_norm.weight) in no_decay_ids
    assert id(model.layers["0"].attn.qkv.weight) not in no_decay_ids
    assert id(model.lm_head.weight) not in no_decay_ids  # untied output layer is a projection
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == model.num_parameters()


def test_clip_grad_norm_matches_torch():
    model = GPT(ModelConfig(num_layers=1, hidden_size=32, num_heads=4, vocab_size=64,
                            seq_len=8))
    optimizer = ParallelOptimizer(model, Topology.build(), TrainConfig())
    for p in optimizer.params:
        p.grad = torch.randn_like(p) * 3
    clones = [torch.nn.Parameter(p.detach().clone()) for p in optimizer.params]
    for p, c in zip(optimizer.params, clones, strict=True):
        c.grad = p.grad.clone()
    ours = optimizer.clip_grad_norm(1.0)
    ref = torch.nn.utils.clip_grad_norm_(clones, 1.0)
    assert ours == pytest.approx(ref.item(), rel=1e-6)
    for p, c in zip(optimizer.params, clones, strict=True):
        torch.testing.assert_close(p.grad, c.grad)


def test_loss_scaler_backoff_hysteresis_and_growth():
    scaler = DynamicLossScaler(initial_scale=1024, growth_interval=3, hysteresis=2)
    scaler.update(True)
    assert scaler.scale == 1024  # first overflow absorbed by hysteresis
    scaler.update(True)
    assert scaler.scale == 512
    for _ in range(3):
        scaler.update(False)
    assert scaler.scale == 1024
    state = scaler.state_dict()
    other = DynamicLossScaler()
    other.load_state_dict(state)
    assert other.state_dict() == state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_adamw_equals_torch_adamw_bit_for_bit(dtype):
    """Three updates with changing gradients, per-group decay and a new lr each step: the same
    parameters and moments as `torch.optim.AdamW(fused=True)`, exactly."""
    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (3, 4, 5)]
    ours = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]

    def groups(params):
        return [{"params": params[:2], "weight_decay": 0.1},
                {"params": params[2:], "weight_decay": 0.0}]

    fused = FusedAdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    torch_adamw = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                    fused=True)
    for step in range(3):
        for p, q in zip(ours, ref, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        for optimizer in (fused, torch_adamw):
            for group in optimizer.param_groups:
                group["lr"] = 1e-2 / (step + 1)
            optimizer.step()
    for p, q in zip(ours, ref, strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fused.state[p][key], torch_adamw.state[q][key])


def test_fused_adamw_skips_parameters_without_gradients():
    frozen, trained = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = FusedAdamW([{"params": [frozen, trained], "weight_decay": 0.0}], lr=0.1,
                           betas=(0.9, 0.999), eps=1e-8)
    trained.grad = torch.ones(3)
    optimizer.step()
    assert torch.equal(frozen, torch.ones(3)) and optimizer.state[frozen]["step"] == 0
    assert torch.allclose(trained, torch.full((3,), 0.9)) and optimizer.state[trained]["step"] == 1
