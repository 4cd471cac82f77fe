"""Pipeline parallelism: the stage split and the 1F1B schedule over micro-batches.

Hand-written over `batch_isend_irecv` (rather than `torch.distributed.pipelining`) so the same
function runs one stage (pp=1: forward then backward per micro-batch) or many, the loss is
normalised by a global token count, tied embeddings stay plain parameters and gloo works.
Stage `i` owns a contiguous block of layers; the first also owns the embeddings, the last the
final norm and the head. Activations crossing stages keep their tp layout (sequence shards
under sequence parallelism), and every stage gets the full `positions` (RoPE needs them) and
the micro-batch's `attn_mask`, if any.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from megaloom.layout_rules import rank_layers
from megaloom.parallel.topology import Topology


def chunk_layers(num_layers: int, topo: Topology, vpp: int = 1) -> list[range]:
    """This rank's layer blocks (`megaloom.layout_rules.rank_layers`)."""
    return rank_layers(num_layers, topo.pp, vpp, topo.pp_axis.rank)


def split_stage(model: nn.Module, topo: Topology, vpp: int = 1) -> None:
    """Drop in place what this rank's stage does not own (layer names keep global indices)."""
    keep = {str(i) for block in chunk_layers(len(model.layers), topo, vpp) for i in block}
    for name in [n for n in model.layers if n not in keep]:
        del model.layers[name]
    dropped = (() if topo.is_first_stage else model.FIRST_STAGE) + (
        () if topo.is_last_stage else model.LAST_STAGE)
    for name in dropped:
        setattr(model, name, None)


class _P2P:
    """Point-to-point transfers with the neighbouring stages, counted on the pp axis."""

    def __init__(self, topo: Topology, shape: tuple[int, ...], dtype: torch.dtype):
        self.axis = topo.pp_axis
        self.shape, self.dtype, self.device = shape, dtype, topo.device
        ranks, me = self.axis.ranks, self.axis.rank
        self.prev = ranks[me - 1] if me > 0 else None
        self.next = ranks[me + 1] if me + 1 < len(ranks) else None

    @classmethod
    def for_model(cls, model: nn.Module, micro_batches: list[dict[str, torch.Tensor]],
                  topo: Topology, sequence_parallel: bool) -> _P2P:
        """Transfers of the activations (micro_batch, seq or seq / tp, hidden) of `model`."""
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        batch, seq = micro_batches[0]["tokens"].shape
        seq = seq // topo.tp if sequence_parallel else seq
        return cls(topo, (batch, seq, model.config.hidden_size), dtype)

    def exchange(self, send_next=None, send_prev=None, recv_prev=False, recv_next=False):
        """Post all sends/receives at once; return (from_prev, from_next)."""
        ops, received = [], {}
        for tensor, peer in ((send_next, self.next), (send_prev, self.prev)):
            if tensor is not None:
                self.axis.count("send", tensor.numel())
                ops.append(dist.P2POp(dist.isend, tensor.contiguous(), peer, self.axis.group))
        for wanted, peer, key in ((recv_prev, self.prev, "prev"), (recv_next, self.next, "next")):
            if wanted:
                buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                received[key] = buf
                ops.append(dist.P2POp(dist.irecv, buf, peer, self.axis.group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                self.axis.wait(request)
        return received.get("prev"), received.get("next")


def backward_stage(output: torch.Tensor, grad_output: torch.Tensor | None) -> None:
    """Backpropagate a stage's `output` (the loss on the last stage, where `grad_output` is
    None) given the gradient the next stage sent back.

    It backpropagates the scalar `sum(output * grad_output)`, whose gradient with respect to
    `output` is `grad_output` exactly (sum passes 1, the product multiplies it by
    `grad_output`; the scalar's own value is never used, so it may overflow harmlessly),
    instead of passing `grad_tensors`: PyTorch checks explicit gradients' shapes with
    `torch.fx`'s symbolic shapes, which imports SymPy (~25 MB on every rank of a pipeline, which
    no layout divides)."""
    if grad_output is not None:
        output = torch.sum(output * grad_output)
    torch.autograd.backward(output)


def stage_forward(model: nn.Module, inputs: torch.Tensor, batch: dict[str, torch.Tensor]):
    """One stage's forward of a micro-batch: `inputs` (ids, or the previous stage's hidden
    states) and the arguments the model's family takes from the batch (`stage_inputs`)."""
    return model(inputs, **model.stage_inputs(batch))


@torch.no_grad()
def forward_only(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    topo: Topology,
    loss_fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    sequence_parallel: bool = False,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Evaluation: forward every micro-batch through the stages; the summed `loss_fn` values
    on the last stage, 0 elsewhere."""
    total = torch.zeros((), dtype=torch.float64, device=topo.device)
    if not micro_batches:
        return total
    p2p = _P2P.for_model(model, micro_batches, topo, sequence_parallel)
    for batch in micro_batches:
        received, _ = p2p.exchange(recv_prev=not topo.is_first_stage)
        with forward_context():
            output = stage_forward(model, batch["tokens"] if received is None else received,
                                    batch)
        if topo.is_last_stage:
            total += loss_fn(output, batch).double()
        else:
            p2p.exchange(send_next=output)
    return total


def forward_backward(
    model: nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    topo: Topology,
    loss_fn: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor],
    sequence_parallel: bool = False,
    loss_scale: float = 1.0,
    forward_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Run forward and backward of every micro-batch with the 1F1B schedule; gradients
    accumulate in `.grad`. `loss_fn(stage_output, micro_batch)` runs on the last stage and
    should already be normalised (e.g. summed token losses / global token count).

    Returns the sum of the micro-batch losses (unscaled) on the last stage, 0 elsewhere.
    """
    p2p = _P2P.for_model(model, micro_batches, topo, sequence_parallel)
    first, last = topo.is_first_stage, topo.is_last_stage
    total = torch.zeros((), dtype=torch.float64, device=topo.device)
    in_flight: list[tuple[torch.Tensor | None, torch.Tensor]] = []

    def forward(index: int, received: torch.Tensor | None) -> torch.Tensor:
        nonlocal total
        batch = micro_batches[index]
        inputs = batch["tokens"] if first else received.requires_grad_()
        with forward_context():
            output = stage_forward(model, inputs, batch)
        if last:
            output = loss_fn(output, batch)
            total += output.detach().double()
            output = output * loss_scale
        in_flight.append((None if first else inputs, output))
        return output

    def backward(grad_output: torch.Tensor | None) -> torch.Tensor | None:
        inputs, output = in_flight.pop(0)
        backward_stage(output, None if last else grad_output)
        return None if first else inputs.grad

    count = len(micro_batches)
    warmup = min(topo.pp - topo.pp_axis.rank - 1, count)
    for index in range(warmup):
        received, _ = p2p.exchange(recv_prev=not first)
        output = forward(index, received)
        p2p.exchange(send_next=None if last else output.detach())
    received = p2p.exchange(recv_prev=not first)[0] if warmup < count else None
    for index in range(warmup, count):
        output = forward(index, received)
        _, grad_output = p2p.exchange(send_next=None if last else output.detach(),
                                      recv_next=not last)
        grad_input = backward(grad_output)
        more = index + 1 < count
        received, _ = p2p.exchange(send_prev=grad_input, recv_prev=more and not first)
    for _ in range(warmup):
        _, grad_output = p2p.exchange(recv_next=not last)
        p2p.exchange(send_prev=backward(grad_output))
    return total
