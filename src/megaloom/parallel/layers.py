"""Tensor-parallel layers: column-, row- and vocab-parallel, built by slicing full weights.

Every sharded parameter carries `tp_dim` (the split dimension) and `tp_full` (its unsharded
length) so `parallelize.gather_tensor` can rebuild the full tensor and `shard_tensor` can slice
one; a dimension that does not divide evenly is padded with zero rows (only the vocabulary
needs this). Parameters replicated over tp whose gradients are partial under sequence
parallelism carry `sequence_parallel = True`; `data_parallel.reduce_gradients` sums them over tp.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megaloom.model.init import Box
from megaloom.parallel.mappings import (
    copy_to,
    gather_seq,
    reduce_from,
    reduce_scatter_seq,
    scatter_seq,
)
from megaloom.parallel.random import RNGTracker
from megaloom.parallel.topology import Axis


def shard_tensor(full: torch.Tensor, axis: Axis, dim: int) -> torch.Tensor:
    """This rank's slice of `full` along `dim`, zero-padded so every rank gets equal length."""
    length = full.shape[dim]
    local = math.ceil(length / axis.size)
    if full.is_meta:  # only the shape exists (and torch's meta cat/strided clone would load
        shape = list(full.shape)  # its Python meta kernels, ~75 MB, in every process)
        shape[dim] = local
        return full.new_empty(shape)
    if local * axis.size != length:
        pad_shape = list(full.shape)
        pad_shape[dim] = local * axis.size - length
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
    return full.narrow(dim, axis.rank * local, local).clone()


def sharded_parameter(full: torch.Tensor, axis: Axis, dim: int) -> nn.Parameter:
    param = nn.Parameter(shard_tensor(full.detach(), axis, dim))
    param.tp_dim = dim
    param.tp_full = full.shape[dim]
    return param


def _replicated(tensor: torch.Tensor | None, sequence_parallel: bool) -> nn.Parameter | None:
    if tensor is None:
        return None
    param = nn.Parameter(tensor.detach().clone())
    param.sequence_parallel = sequence_parallel
    return param


class ColumnParallelLinear(nn.Module):
    """`y = x W^T + b` with W's output rows split over tp; the output stays sharded.

    The input is replicated (copy_to: gradient all-reduced) or, under sequence parallelism,
    sequence-sharded and all-gathered here (gradient reduce-scattered).
    """

    def __init__(self, full: nn.Linear, axis: Axis, sequence_parallel: bool = False):
        super().__init__()
        self.axis = axis
        self.sequence_parallel = sequence_parallel
        self.weight = sharded_parameter(full.weight, axis, 0)
        self.bias = sharded_parameter(full.bias, axis, 0) if full.bias is not None else None
        self.in_features = full.in_features
        self.out_features = self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gather_seq(x, self.axis) if self.sequence_parallel else copy_to(x, self.axis)
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """`y = x W^T + b` with W's input columns split over tp; partial outputs are summed
    (all-reduce, or reduce-scatter onto sequence shards) before the replicated bias is added."""

    def __init__(self, full: nn.Linear, axis: Axis, sequence_parallel: bool = False):
        super().__init__()
        self.axis = axis
        self.sequence_parallel = sequence_parallel
        self.weight = sharded_parameter(full.weight, axis, 1)
        self.bias = _replicated(full.bias, sequence_parallel)
        self.in_features = self.weight.shape[1]
        self.out_features = full.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        reduce = reduce_scatter_seq if self.sequence_parallel else reduce_from
        y = reduce(y, self.axis)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary rows split over tp: each rank looks up the ids it
    owns, zeros the rest, and the partial results are summed (or reduce-scattered)."""

    def __init__(self, full: nn.Embedding, axis: Axis, sequence_parallel: bool = False):
        super().__init__()
        self.axis = axis
        self.sequence_parallel = sequence_parallel
        self.weight = sharded_parameter(full.weight, axis, 0)
        self.weight.embedding = True
        self.vocab_start = axis.rank * self.weight.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[..., None], 0.0)
        if self.sequence_parallel:
            return reduce_scatter_seq(out, self.axis)
        return reduce_from(out, self.axis)


class SequenceShardedEmbedding(nn.Embedding):
    """A replicated embedding (learned positions) whose output keeps this rank's sequence shard."""

    def __init__(self, full: nn.Embedding, axis: Axis):
        super().__init__(full.num_embeddings, full.embedding_dim, device=full.weight.device,
                         dtype=full.weight.dtype)
        self.axis = axis
        with torch.no_grad():
            self.weight.copy_(full.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return scatter_seq(super().forward(ids), self.axis)


class ForkedDropout(nn.Dropout):
    """Dropout drawn from a named tracker stream (used where activations are tp-sharded)."""

    def __init__(self, p: float, tracker: RNGTracker, stream: str):
        super().__init__(p)
        self.tracker = tracker
        self.stream = stream

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        with self.tracker.fork(self.stream):
            return super().forward(x)


def shard_box(param: nn.Parameter, axis: Axis) -> tuple[tuple[int, ...], Box]:
    """(full shape, box of the full tensor this rank's `param` holds), padding excluded; the
    box starts at the local tensor's origin."""
    dim = getattr(param, "tp_dim", None)
    shape = tuple(param.shape)
    if dim is None:
        return shape, tuple((0, size) for size in shape)
    local, full = shape[dim], param.tp_full
    start = min(axis.rank * local, full)
    full_shape = shape[:dim] + (full,) + shape[dim + 1:]
    box = tuple((start, min(start + local, full)) if d == dim else (0, size)
                for d, size in enumerate(shape))
    return full_shape, box
