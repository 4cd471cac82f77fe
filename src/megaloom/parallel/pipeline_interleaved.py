"""The interleaved (virtual-stage) 1F1B pipeline schedule.

With `vpp` virtual stages each rank holds `vpp` layer chunks: chunk `c` of rank `r` is block
`c * pp + r` of the model, so a micro-batch visits every rank `vpp` times and the pipeline
bubble shrinks by `vpp` (Megatron's interleaved schedule). The op order per rank is Megatron's
(warm-up forwards, one-forward-one-backward, cool-down backwards; micro-batches in groups of
`pp`). It runs as a dataflow: activations and gradients go out with asynchronous, tagged sends
(a tag names the micro-batch, the receiving chunk and the direction), and each op waits only
for its own input, so no pairing of sends and receives is needed. Tags need a backend that
matches them, so it runs on gloo only (`check_backend`); the number of micro-batches must be a
multiple of pp.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from megaloom.parallel.pipeline import backward_stage, chunk_layers, stage_forward
from megaloom.parallel.topology import Topology


def chunk_views(model: nn.Module, topo: Topology, vpp: int) -> list[nn.Module]:
    """One module per local chunk sharing `model`'s parameters: its layers only, the embedding
    on the first chunk of the model, the head on the last."""
    views = []
    last = vpp - 1
    for c, block in enumerate(chunk_layers(model.config.num_layers, topo, vpp)):
        view = nn.Module.__new__(type(model))
        view.__dict__ = dict(model.__dict__)
        view._modules = dict(model._modules)
        view._modules["layers"] = nn.ModuleDict({str(i): model.layers[str(i)] for i in block})
        dropped = (() if c == 0 else model.FIRST_STAGE) + (() if c == last else model.LAST_STAGE)
        view._modules.update(dict.fromkeys(dropped))
        views.append(view)
    return views


def schedule(rank: int, pp: int, vpp: int, micro_batches: int) -> list[tuple[str, int, int]]:
    """This rank's ops in order: ("F" | "B", micro_batch, local chunk)."""
    if micro_batches % pp:
        raise ValueError(f"the interleaved schedule needs a number of micro-batches per step "
                         f"({micro_batches}) divisible by parallel.pp={pp}")
    total = micro_batches * vpp

    def locate(k: int, backward: bool) -> tuple[int, int]:
        group, within = divmod(k, pp * vpp)
        chunk = within // pp
        return group * pp + within % pp, (vpp - 1 - chunk) if backward else chunk

    warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    ops = [("F", *locate(k, False)) for k in range(warmup)]
    for k in range(total - warmup):
        ops += [("F", *locate(warmup + k, False)), ("B", *locate(k, True))]
    ops += [("B", *locate(k, True)) for k in range(total - warmup, total)]
    return ops


def check_backend(topo: Topology) -> None:
    """Tagged point-to-point messages are matched by tag only on gloo; NCCL matches in issue
    order, which this dataflow schedule does not guarantee."""
    if topo.pp > 1 and dist.get_backend(topo.pp_axis.group) != "gloo":
        raise ValueError("parallel.vpp > 1 (the interleaved schedule) needs the gloo backend "
                         "(CPU); use parallel.vpp=1 on GPUs")


class _TaggedP2P:
    """Asynchronous tagged sends and waited receives around the pipeline ring."""

    def __init__(self, model: nn.Module, micro_batches: list[dict[str, torch.Tensor]],
                 topo: Topology, vpp: int, sequence_parallel: bool):
        self.axis, self.device, self.chunks = topo.pp_axis, topo.device, topo.pp * vpp
        check_backend(topo)
        rank, ranks = topo.pp_axis.rank, topo.pp_axis.ranks
        self.prev, self.next = ranks[(rank - 1) % topo.pp], ranks[(rank + 1) % topo.pp]
        batch, seq = micro_batches[0]["tokens"].shape
        seq = seq // topo.tp if sequence_parallel else seq
        self.shape = (batch, seq, model.config.hidden_size)
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.pending: list[tuple[dist.Work, torch.Tensor]] = []

    def tag(self, mb: int, chunk_id: int, backward: bool) -> int:
        """Names the micro-batch, the receiving chunk and the direction."""
        return 2 * (mb * self.chunks + chunk_id) + int(backward)

    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        tensor = tensor.contiguous()
        self.axis.count("send", tensor.numel())
        self.pending.append((dist.isend(tensor, peer, group=self.axis.group, tag=tag), tensor))

    def receive(self, peer: int, tag: int) -> torch.Tensor:
        buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.axis.wait(dist.irecv(buffer, peer, group=self.axis.group, tag=tag))
        return buffer

    def finish(self) -> None:
        for work, _ in self.pending:
            self.axis.wait(work)
        self.pending.clear()


def interleaved_forward_backward(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    topo: Topology,
    loss_fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    vpp: int,
    sequence_parallel: bool = False,
    loss_scale: float = 1.0,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Same contract as `pipeline.forward_backward`, with `vpp` chunks per rank."""
    pp, rank = topo.pp, topo.pp_axis.rank
    chunks = pp * vpp
    views = chunk_views(model, topo, vpp)
    p2p = _TaggedP2P(model, micro_batches, topo, vpp, sequence_parallel)
    tag, send, receive = p2p.tag, p2p.send, p2p.receive
    total = torch.zeros((), dtype=torch.float64, device=topo.device)
    saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
    for kind, mb, c in schedule(rank, pp, vpp, len(micro_batches)):
        chunk_id = c * pp + rank
        if kind == "F":
            data = micro_batches[mb]
            inputs = (data["tokens"] if chunk_id == 0
                      else receive(p2p.prev, tag(mb, chunk_id, False)).requires_grad_())
            with forward_context():
                output = stage_forward(views[c], inputs, data)
            if chunk_id == chunks - 1:
                output = loss_fn(output, data)
                total += output.detach().double()
                output = output * loss_scale
            else:
                send(output.detach(), p2p.next, tag(mb, chunk_id + 1, False))
            saved[(mb, c)] = (None if chunk_id == 0 else inputs, output)
        else:
            inputs, output = saved.pop((mb, c))
            grad = (None if chunk_id == chunks - 1
                    else receive(p2p.next, tag(mb, chunk_id, True)))
            backward_stage(output, grad)
            if chunk_id != 0:
                send(inputs.grad, p2p.prev, tag(mb, chunk_id - 1, True))
    p2p.finish()
    return total


@torch.no_grad()
def interleaved_forward_only(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    topo: Topology,
    loss_fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    vpp: int,
    sequence_parallel: bool = False,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Same contract as `pipeline.forward_only`, with `vpp` chunks per rank."""
    total = torch.zeros((), dtype=torch.float64, device=topo.device)
    if not micro_batches:
        return total
    views = chunk_views(model, topo, vpp)
    p2p = _TaggedP2P(model, micro_batches, topo, vpp, sequence_parallel)
    for mb, data in enumerate(micro_batches):
        for c, view in enumerate(views):
            chunk_id = c * topo.pp + topo.pp_axis.rank
            inputs = (data["tokens"] if chunk_id == 0
                      else p2p.receive(p2p.prev, p2p.tag(mb, chunk_id, False)))
            with forward_context():
                output = stage_forward(view, inputs, data)
            if chunk_id == p2p.chunks - 1:
                total += loss_fn(output, data).double()
            else:
                p2p.send(output, p2p.next, p2p.tag(mb, chunk_id + 1, False))
    p2p.finish()
    return total
