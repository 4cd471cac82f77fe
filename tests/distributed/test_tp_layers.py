"""Vocab-parallel cross-entropy and distillation KL against the plain losses (padding columns
included), the dropout
RNG streams (identical where activations are replicated, different where sharded), and fp16
overflow agreed by all ranks."""

import torch
import torch.nn.functional as F
from harness import spawn

from megaloom.config import ModelConfig, TrainConfig
from megaloom.model.gpt import GPT
from megaloom.parallel.data_parallel import ParallelOptimizer
from megaloom.parallel.layers import shard_tensor
from megaloom.parallel.loss import vocab_parallel_cross_entropy, vocab_parallel_kl
from megaloom.parallel.parallelize import parallelize
from megaloom.parallel.random import TP_STREAM, seed_everything
from megaloom.parallel.topology import Topology

VOCAB, PADDED = 61, 62  # over 4 ranks: 16 columns each; the last 3 are padding (1 model, 2 tp)


def _gathered(tensor, axis):
    return axis.all_gather(tensor[None], 0)


def _cross_entropy(axis):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, PADDED, generator=gen, dtype=torch.float64) * 3
    logits[..., VOCAB:] = 50.0  # padding columns must not count even when large
    targets = torch.randint(0, VOCAB, (2, 5), generator=gen)
    upstream = torch.rand(2, 5, generator=gen, dtype=torch.float64)
    full = logits.clone().requires_grad_(True)
    want = F.cross_entropy(full[..., :VOCAB].reshape(-1, VOCAB), targets.reshape(-1),
                           reduction="none").view(2, 5)
    (want * upstream).sum().backward()
    local = shard_tensor(logits, axis, -1).requires_grad_(True)
    got = vocab_parallel_cross_entropy(local, targets, axis, VOCAB)
    (got * upstream).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(local.grad, shard_tensor(full.grad, axis, -1), rtol=1e-12,
                               atol=1e-12)


def _kl(axis, temperature=2.0):
    gen = torch.Generator().manual_seed(4)
    student, teacher = (torch.randn(2, 5, PADDED, generator=gen, dtype=torch.float64) * 3
                        for _ in range(2))
    student[..., VOCAB:], teacher[..., VOCAB:] = 40.0, -7.0  # padding never counts
    upstream = torch.rand(2, 5, generator=gen, dtype=torch.float64)
    full = student.clone().requires_grad_(True)
    want = temperature**2 * F.kl_div(
        F.log_softmax(full[..., :VOCAB] / temperature, -1),
        F.log_softmax(teacher[..., :VOCAB] / temperature, -1), reduction="none",
        log_target=True).sum(-1)
    (want * upstream).sum().backward()
    local = shard_tensor(student, axis, -1).requires_grad_(True)
    got = vocab_parallel_kl(local, shard_tensor(teacher, axis, -1), axis, VOCAB, temperature)
    (got * upstream).sum().backward()
    assert want.min() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(local.grad, shard_tensor(full.grad, axis, -1), rtol=1e-12,
                               atol=1e-12)
    same = vocab_parallel_kl(local.detach(), local.detach(), axis, VOCAB, temperature)
    torch.testing.assert_close(same, torch.zeros_like(same), rtol=0, atol=1e-12)


def _rng_streams(topo):
    tracker = seed_everything(11, topo)
    axis = topo.tp_axis
    replicated = F.dropout(torch.ones(64), 0.5)
    with tracker.fork(TP_STREAM):
        sharded = F.dropout(torch.ones(64), 0.5)
    after = torch.rand(8)
    torch.manual_seed(11)
    F.dropout(torch.ones(64), 0.5)
    assert torch.equal(after, torch.rand(8)), "fork() must not advance the default stream"
    same, per_rank = _gathered(replicated, axis), _gathered(sharded, axis)
    assert all(torch.equal(same[0], row) for row in same)
    assert all(not torch.equal(per_rank[0], row) for row in per_rank[1:])


def _dropout_keeps_replicas_equal(topo):
    cfg = ModelConfig(arch="gpt2", num_layers=2, hidden_size=32, num_heads=4, seq_len=8,
                      vocab_size=VOCAB, make_vocab_size_divisible_by=1, dropout=0.3)
    torch.manual_seed(0)
    model = parallelize(GPT(cfg), topo, tracker=seed_everything(5, topo)).train()
    seen = []
    model.final_norm.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    model(torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1)))
    hidden = _gathered(seen[0], topo.tp_axis)
    assert all(torch.equal(hidden[0], row) for row in hidden[1:])


def _overflow_is_agreed(topo):
    """One rank's non-finite gradient makes the global norm non-finite on every rank, so all
    ranks skip the fp16 step together."""
    cfg = ModelConfig(arch="llama", num_layers=1, hidden_size=32, num_heads=4, seq_len=8,
                      vocab_size=VOCAB, make_vocab_size_divisible_by=1, ffn_hidden_size=64)
    model = parallelize(GPT(cfg), topo)
    optimizer = ParallelOptimizer(model, topo, TrainConfig())
    for param in optimizer.params:
        param.grad = torch.zeros_like(param)
    if topo.tp_axis.rank == 2:
        model.layers["0"].mlp.up.weight.grad[0, 0] = float("inf")
    optimizer.reduce_gradients()
    norms = _gathered(torch.tensor(optimizer.clip_grad_norm(1.0)), topo.tp_axis)
    assert torch.isinf(norms).all()


def _worker(rank, world):
    topo = Topology.build(tp=world)
    _cross_entropy(topo.tp_axis)
    _kl(topo.tp_axis)
    _rng_streams(topo)
    _dropout_keeps_replicas_equal(topo)
    _overflow_is_agreed(topo)


def test_vocab_parallel_loss_and_rng_streams_on_four_ranks():
    spawn(_worker, 4)


def test_vocab_parallel_loss_single_rank():
    _cross_entropy(Topology.build().tp_axis)
    _kl(Topology.build().tp_axis)
