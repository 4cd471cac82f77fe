"""Megatron's conjugate collectives as autograd functions over a tensor-parallel `Axis`.

Each forward collective has its adjoint as backward:

    copy_to        identity        <-> all-reduce
    reduce_from    all-reduce      <-> identity
    split_last     split last dim  <-> all-gather last dim
    gather_last    all-gather last <-> split last dim
    scatter_seq    split seq dim   <-> all-gather seq dim
    gather_seq     all-gather seq  <-> reduce-scatter seq dim (input feeds tp-sharded compute)
    reduce_scatter_seq reduce-scatter seq <-> all-gather seq

Activations are (batch, seq, hidden), so the sequence dimension is 1. On an axis of size 1
every function is the identity.
"""

from __future__ import annotations

import torch

from megaloom.parallel.topology import Axis

SEQ_DIM = 1


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return x

    @staticmethod
    def backward(ctx, grad):
        return ctx.axis.all_reduce(grad.clone()), None


class _ReduceFrom(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        return axis.all_reduce(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SplitLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return axis.chunk(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return ctx.axis.all_gather(grad, -1), None


class _GatherLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return axis.all_gather(x, -1)

    @staticmethod
    def backward(ctx, grad):
        return ctx.axis.chunk(grad, -1), None


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return axis.chunk(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return ctx.axis.all_gather(grad, SEQ_DIM), None


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return axis.all_gather(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return ctx.axis.reduce_scatter(grad, SEQ_DIM), None


class _ReduceScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return axis.reduce_scatter(x, SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return ctx.axis.all_gather(grad, SEQ_DIM), None


def copy_to(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, all-reduce the gradient."""
    return x if axis.size == 1 else _CopyTo.apply(x, axis)


def reduce_from(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Leave a tensor-parallel region: all-reduce forward, identity backward."""
    return x if axis.size == 1 else _ReduceFrom.apply(x, axis)


def split_last(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Keep this rank's slice of the last dim; the gradient is all-gathered."""
    return x if axis.size == 1 else _SplitLast.apply(x, axis)


def gather_last(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """All-gather the last dim; the gradient is split back."""
    return x if axis.size == 1 else _GatherLast.apply(x, axis)


def scatter_seq(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Keep this rank's sequence shard; the gradient is all-gathered."""
    return x if axis.size == 1 else _ScatterSeq.apply(x, axis)


def gather_seq(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """All-gather sequence shards; the gradient (partial per rank) is reduce-scattered."""
    return x if axis.size == 1 else _GatherSeq.apply(x, axis)


def reduce_scatter_seq(x: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Sum partial results and keep this rank's sequence shard; the gradient is all-gathered."""
    return x if axis.size == 1 else _ReduceScatterSeq.apply(x, axis)
