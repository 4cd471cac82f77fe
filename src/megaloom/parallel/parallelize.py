"""Turn a plain model (`GPT`, or a family built on its layers) into this rank's part of a
(tp, pp, dp) layout, and back.

`parallelize` keeps this rank's pipeline stage, swaps Linear/Embedding modules for their
tensor-parallel versions (slicing the full, layout-independent initial weights), and wires
sequence parallelism and the dropout RNG streams. `gather_full` rebuilds full tensors named as in
the plain model (tests compare them with the single-process model; checkpoints never gather).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megaloom.config import ModelConfig
from megaloom.layout_rules import LayoutSpec, layout_problems
from megaloom.model.gpt import GPT
from megaloom.parallel.layers import (
    ColumnParallelLinear,
    ForkedDropout,
    RowParallelLinear,
    SequenceShardedEmbedding,
    VocabParallelEmbedding,
    sharded_parameter,
)
from megaloom.parallel.pipeline import split_stage
from megaloom.parallel.random import TP_STREAM, RNGTracker
from megaloom.parallel.topology import Axis, Topology


def check_layout(config: ModelConfig, topo: Topology, sequence_parallel: bool, vpp: int = 1,
                 activation_checkpointing: bool = False, micro_batch: int | None = None,
                 global_batch: int | None = None) -> None:
    """Reject a layout the model cannot be split into (`megaloom.layout_rules`), naming the
    config key."""
    spec = LayoutSpec(tp=topo.tp, pp=topo.pp, vpp=vpp, dp=topo.dp,
                      sequence_parallel=sequence_parallel, micro_batch=micro_batch,
                      global_batch=global_batch,
                      activation_checkpointing=activation_checkpointing)
    problems = layout_problems(config, spec)
    if problems:
        raise ValueError(problems[0][1])


def parallelize(
    model: GPT,
    topo: Topology,
    sequence_parallel: bool = False,
    tracker: RNGTracker | None = None,
    vpp: int = 1,
) -> GPT:
    """Shard `model` in place for this rank and move it to `topo.device` (a `meta` model stays
    on meta, for `build.materialize`); returns it.

    `tracker` (from `random.seed_everything`) supplies the per-tp-rank dropout stream; it is
    only needed when the model has dropout and tp > 1. `vpp` > 1 keeps `vpp` interleaved
    layer chunks per rank (see `pipeline_interleaved`).
    """
    check_layout(model.config, topo, sequence_parallel, vpp,
                 getattr(model, "activation_checkpointing", False))
    cfg, axis = model.config, topo.tp_axis
    sp = sequence_parallel and topo.tp > 1
    tied = cfg.tied_head
    split_stage(model, topo, vpp)
    for block in model.blocks():
        _parallelize_block(block, cfg, topo, sp, tracker)
    for name in getattr(model, "HEAD_SHARDED", ()):  # per-head tables (T5's position biases)
        table = getattr(model, name)
        table.weight = sharded_parameter(table.weight, axis, 1)
    if model.embed is not None:
        model.embed = VocabParallelEmbedding(model.embed, axis, sp)
        for name in ("pos_embed", "token_type_embed"):  # replicated, indexed per position
            if sp and getattr(model, name, None) is not None:
                setattr(model, name, SequenceShardedEmbedding(getattr(model, name), axis))
        if sp and cfg.dropout > 0:
            model.embed_dropout = ForkedDropout(cfg.dropout, _need(tracker), TP_STREAM)
    if sp:  # replicated modules that see sequence shards: their gradients are partial
        for name in ("final_norm", *getattr(model, "SEQUENCE_REPLICATED", ())):
            if getattr(model, name) is not None:
                _mark_sequence_parallel(getattr(model, name))
    if model.lm_head is not None:
        model.lm_head = ColumnParallelLinear(model.lm_head, axis, sp)
        if tied and model.embed is not None:
            model.lm_head.weight = model.embed.weight
        else:
            model.lm_head.weight.embedding = tied  # the last stage's copy of a tied embedding
    if tied and topo.pp > 1 and (model.embed is not None or model.lm_head is not None):
        stage_copy = model.embed.weight if model.embed is not None else model.lm_head.weight
        stage_copy.tied_embedding = True
        stage_copy.norm_duplicate = model.embed is None
    on_meta = next(model.parameters()).device.type == "meta"
    return model if on_meta else model.to(topo.device)


def _parallelize_block(block: nn.Module, cfg: ModelConfig, topo: Topology, sp: bool,
                       tracker: RNGTracker | None) -> None:
    """Megatron's pairs in one layer: column-parallel q/k/v (fused or apart) and MLP inputs,
    row-parallel outputs; norms marked sequence-parallel; attention dropout on the tp stream.
    Cross-attention (T5's decoder layers) is split like self-attention, by heads."""
    axis = topo.tp_axis
    attentions = [block.attn] + ([block.cross_attn] if hasattr(block, "cross_attn") else [])
    for attn in attentions:
        for name in ("qkv", "q", "k", "v"):
            if hasattr(attn, name):
                setattr(attn, name, ColumnParallelLinear(getattr(attn, name), axis, sp))
        attn.proj = RowParallelLinear(attn.proj, axis, sp)
    mlp = block.mlp
    mlp.up = ColumnParallelLinear(mlp.up, axis, sp)
    if mlp.gate is not None:
        mlp.gate = ColumnParallelLinear(mlp.gate, axis, sp)
    mlp.down = RowParallelLinear(mlp.down, axis, sp)
    if sp:
        for name in ("attn_norm", "cross_norm", "mlp_norm"):
            if hasattr(block, name):
                _mark_sequence_parallel(getattr(block, name))
    if cfg.dropout > 0 and topo.tp > 1:
        for attn in attentions:  # attention dropout acts on local heads
            _fork_during_forward(attn, _need(tracker))
        if sp:
            block.dropout = ForkedDropout(cfg.dropout, _need(tracker), TP_STREAM)


def _need(tracker: RNGTracker | None) -> RNGTracker:
    if tracker is None:
        raise ValueError("dropout under tensor parallelism needs an RNG tracker "
                         "(megaloom.parallel.random.seed_everything)")
    return tracker


def _mark_sequence_parallel(module: nn.Module) -> None:
    for param in module.parameters():
        param.sequence_parallel = True


def _fork_during_forward(module: nn.Module, tracker: RNGTracker) -> None:
    """Run `module.forward` inside the tensor-parallel RNG stream."""
    active = []

    def enter(_module, _args):
        context = tracker.fork(TP_STREAM)
        context.__enter__()
        active.append(context)

    def leave(_module, _args, _output):
        active.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


# ----------------------------------------------------------------------------- full tensors


def gather_tensor(local: torch.Tensor, param: nn.Parameter, axis: Axis) -> torch.Tensor:
    """The full tensor of a (possibly tp-sharded) parameter-shaped `local`, padding removed."""
    dim = getattr(param, "tp_dim", None)
    if dim is None:
        return local
    return axis.all_gather(local, dim).narrow(dim, 0, param.tp_full)


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter by its plain-model name (a tied weight appears under both names)."""
    return dict(model.state_dict(keep_vars=True))


def gather_full(
    tensors: dict[str, torch.Tensor], model: nn.Module, topo: Topology
) -> dict[str, torch.Tensor] | None:
    """Gather parameter-shaped `tensors` (by name) from all tp ranks and pp stages; the full
    dict (on CPU) is returned on global rank 0, None elsewhere. Every rank must call it."""
    params = named_parameters(model)
    full = {name: gather_tensor(t.detach(), params[name], topo.tp_axis).to("cpu", copy=True)
            for name, t in tensors.items()}
    if topo.tp_axis.rank != 0 or topo.dp_axis.rank != 0:
        return None
    if topo.pp > 1:
        parts = [None] * topo.pp if topo.is_first_stage else None
        dist.gather_object(full, parts, dst=topo.pp_axis.ranks[0], group=topo.pp_axis.group)
        if not topo.is_first_stage:
            return None
        full = {name: t for part in parts for name, t in part.items()}
    return full


def gather_full_state_dict(model: nn.Module, topo: Topology) -> dict[str, torch.Tensor] | None:
    """The plain `GPT` state dict on global rank 0 (None elsewhere)."""
    return gather_full(named_parameters(model), model, topo)
