"""Known-answer forward and backward tests for every conjugate collective, on 2 and 4 ranks."""

import pytest
import torch
from harness import spawn

from megaloom.parallel import mappings as M
from megaloom.parallel.topology import Topology


def _value(rank: int, shape, scale: float = 1.0) -> torch.Tensor:
    return (torch.arange(torch.Size(shape).numel(), dtype=torch.float64).view(shape) + 1
            ) * scale + 100.0 * rank


def _check(fn, x, upstream, want_out, want_grad) -> None:
    x = x.clone().requires_grad_(True)
    out = fn(x)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    out.backward(upstream)
    torch.testing.assert_close(x.grad, want_grad, rtol=0, atol=0)


def _all_mappings(rank: int, world: int) -> None:
    axis = Topology.build(tp=world).tp_axis
    full = (2, 4 * world, 3 * world)  # (batch, seq, hidden): both split dims divide by world
    ranks = range(world)
    seq_chunk = lambda t, r: t.chunk(world, dim=1)[r]
    last_chunk = lambda t, r: t.chunk(world, dim=-1)[r]

    x = _value(rank, full)
    g = _value(rank, full, scale=0.5)
    # copy_to: identity forward; gradient summed over ranks.
    _check(lambda t: M.copy_to(t, axis), x, g, x, sum(_value(r, full, 0.5) for r in ranks))
    # reduce_from: summed forward; gradient passes unchanged.
    _check(lambda t: M.reduce_from(t, axis), x, g, sum(_value(r, full) for r in ranks), g)
    # split_last: every rank holds the same full tensor; the gradient is all-gathered.
    same = _value(0, full)
    shard_g = [last_chunk(_value(r, full, 0.5), r) for r in ranks]
    _check(lambda t: M.split_last(t, axis), same, shard_g[rank], last_chunk(same, rank),
           torch.cat(shard_g, dim=-1))
    # gather_last: shards concatenated; the gradient is split back.
    shards = [last_chunk(_value(r, full), r) for r in ranks]
    _check(lambda t: M.gather_last(t, axis), shards[rank], g, torch.cat(shards, dim=-1),
           last_chunk(g, rank))
    # scatter_seq: sequence shard; the gradient is all-gathered along the sequence.
    seq_g = [seq_chunk(_value(r, full, 0.5), r) for r in ranks]
    _check(lambda t: M.scatter_seq(t, axis), same, seq_g[rank], seq_chunk(same, rank),
           torch.cat(seq_g, dim=1))
    # gather_seq: sequence shards concatenated; the gradient is reduce-scattered.
    seq_x = [seq_chunk(_value(r, full), r) for r in ranks]
    _check(lambda t: M.gather_seq(t, axis), seq_x[rank], g, torch.cat(seq_x, dim=1),
           seq_chunk(sum(_value(r, full, 0.5) for r in ranks), rank))
    # reduce_scatter_seq: summed then sharded; the gradient is all-gathered.
    _check(lambda t: M.reduce_scatter_seq(t, axis), x, seq_g[rank],
           seq_chunk(sum(_value(r, full) for r in ranks), rank), torch.cat(seq_g, dim=1))
    # The volume counter follows the ring formulas: 2n(g-1)/g for an all-reduce of n elements.
    axis.reset_counts()
    axis.all_reduce(torch.zeros(8 * world, dtype=torch.float64))
    assert axis.sent == {"all_reduce": 2 * 8 * (world - 1)}


@pytest.mark.parametrize("world", [2, 4])
def test_conjugate_pairs_known_answers(world):
    spawn(_all_mappings, world)


def test_single_process_is_identity_and_needs_no_process_group():
    topo = Topology.build(tp=1)
    assert topo.world_size == 1 and topo.tp_axis.group is None
    x = torch.randn(2, 4, 6, requires_grad=True)
    for fn in (M.copy_to, M.reduce_from, M.split_last, M.gather_last, M.scatter_seq,
               M.gather_seq, M.reduce_scatter_seq):
        assert fn(x, topo.tp_axis) is x
