"""Shard-local construction: this rank's part of a layout, never the whole model.

`build_shard` builds the plain `GPT` on the `meta` device (shapes only, no memory), lets
`parallelize` cut it to this rank's pipeline stage and tensor-parallel shards (still on meta,
with the `tp_dim`/`tp_full` marks), then `materialize` allocates each local parameter on the
device and fills it from a `TensorSource`, asking only for the box of the full tensor this rank
owns: the layout-independent initialisation (`megaloom.model.init`), a megaloom checkpoint
(`megaloom.checkpoint.shards`) or a Hugging Face directory. Meta first, rather than stage by
stage, because `parallelize` then runs unchanged on real models (tests, inference) and on meta
ones, and a `meta` topology counts the bytes of any rank of any size of model without memory.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from megaloom.checkpoint.shards import ShardWriter, stored_name
from megaloom.config import ModelConfig
from megaloom.model.gpt import GPT
from megaloom.model.init import Box, initial_values
from megaloom.model.registry import build_model
from megaloom.parallel.layers import shard_box
from megaloom.parallel.parallelize import parallelize
from megaloom.parallel.random import RNGTracker
from megaloom.parallel.topology import Topology


class TensorSource(Protocol):
    """Where a model's weights come from: `read(name, full_shape, box)` returns that box of the
    plain model's parameter `name` (full shape given for checking)."""

    def read(self, name: str, shape: tuple[int, ...], box: Box) -> torch.Tensor: ...


class InitSource:
    """Fresh weights: the layout-independent initialisation for run seed `seed`."""

    def __init__(self, config: ModelConfig, seed: int):
        self.config, self.seed = config, seed

    def read(self, name: str, shape: tuple[int, ...], box: Box) -> torch.Tensor:
        return initial_values(name, shape, self.config, self.seed, box)


@torch.no_grad()
def materialize(model: GPT, topo: Topology, source: TensorSource,
                dtype: torch.dtype = torch.float32) -> GPT:
    """Replace every (meta) parameter of this rank's `model` by one on `topo.device` filled
    from `source`; marks (`tp_dim`, ...) and ties are kept. On a `meta` topology only the
    shapes are made."""
    replaced: dict[int, nn.Parameter] = {}
    for param in model.parameters():
        new = nn.Parameter(torch.empty(param.shape, dtype=dtype, device=topo.device),
                           requires_grad=param.requires_grad)
        new.__dict__.update(param.__dict__)
        replaced[id(param)] = new
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and id(param) in replaced:
                module._parameters[key] = replaced[id(param)]
    load_weights(model, topo, source)
    return model


@torch.no_grad()
def load_weights(model: GPT, topo: Topology, source: TensorSource) -> None:
    """Fill this rank's parameters in place with their boxes from `source` (tp padding: 0)."""
    if topo.device.type == "meta":
        return
    for name, param in model.named_parameters():
        full_shape, box = shard_box(param, topo.tp_axis)
        values = source.read(stored_name(name, model.config), full_shape, box)
        param.zero_()
        param[tuple(slice(0, size) for size in values.shape)].copy_(values)


def owned_boxes(model: GPT, topo: Topology):
    """(stored name, parameter, full shape, box) of every tensor this rank writes: dp rank 0
    only, tp-replicated tensors from tp rank 0, a tied head copy never (so each element of
    the plain model is written, or counted, exactly once over the layout)."""
    if topo.dp_axis.rank:
        return
    for name, param in model.named_parameters():
        replicated = getattr(param, "tp_dim", None) is None
        if (replicated and topo.tp_axis.rank) or getattr(param, "norm_duplicate", False):
            continue
        full_shape, box = shard_box(param, topo.tp_axis)
        yield stored_name(name, model.config), param, full_shape, box


def real_part(tensor: torch.Tensor, box: Box) -> torch.Tensor:
    """The local tensor without its tp padding (the part `box` covers)."""
    return tensor[tuple(slice(0, hi - lo) for lo, hi in box)]


def write_weights(writer: ShardWriter, model: GPT, topo: Topology) -> None:
    """Add this rank's weights to a checkpoint `writer` as boxes of the plain model's
    tensors (`owned_boxes`)."""
    for key, param, full_shape, box in owned_boxes(model, topo):
        writer.add(key, full_shape, box, real_part(param.detach(), box))


def build_shard(config: ModelConfig, topo: Topology, source: TensorSource,
                sequence_parallel: bool = False, tracker: RNGTracker | None = None,
                vpp: int = 1) -> GPT:
    """This rank's stage and tp shards of the model of `config` (any family), weights from
    `source`."""
    with torch.device("meta"):
        model = build_model(config)
    parallelize(model, topo, sequence_parallel, tracker, vpp)
    return materialize(model, topo, source)
