"""Gradient reduction over every axis, global-norm clipping and AdamW, plain or ZeRO-1.

`ParallelOptimizer` is what a training step calls after the pipeline's forward/backward:

1. `reduce_gradients()`: sum the partial gradients of sequence-parallel norms/biases over tp,
   the tied embedding copies over the first/last stage, and everything over dp. The dp
   all-reduce works on flat buckets that the gradients live in (as views); after
   `start_backward(n)`, a bucket's asynchronous all-reduce starts during the n-th backward
   pass as soon as all its gradients are final, overlapping the rest of the backward (gloo and
   NCCL both run collectives asynchronously); `finish_backward()` waits for them. With the
   distributed optimizer it is one reduce-scatter per parameter group onto this rank's flat
   shard, after the backward. The loss is already normalised by the global token count, so dp
   reduces by SUM.
2. `clip_grad_norm(max_norm)`: the global L2 norm over all ranks, counting a tp-replicated
   parameter once and a tied embedding once, scaling by max_norm / (norm + 1e-6) like
   `torch.nn.utils.clip_grad_norm_`. Every rank gets the same value, so an fp16
   overflow (a non-finite norm) is agreed by all ranks.
3. `step()`: AdamW (`train.optim.FusedAdamW`) on local parameters, or on the local shard
   followed by an all-gather of the updated parameters (ZeRO-1). Weight decay groups follow
   `train.optim.parameter_groups`.

Optimizer state is saved as boxes of the plain model's tensors (`write_state` / `read_state`,
one `exp_avg/NAME` and `exp_avg_sq/NAME` per parameter), so every rank writes only what it
holds, ZeRO shards included, and any layout reads it back.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megaloom.checkpoint.shards import ShardWriter, TensorStore, flat_range_boxes, stored_name
from megaloom.config import TrainConfig
from megaloom.model.init import box_shape
from megaloom.parallel.layers import shard_box
from megaloom.parallel.topology import Axis, Topology
from megaloom.train.optim import FusedAdamW
from megaloom.train.optim import parameter_groups as plain_parameter_groups

BUCKET_ELEMENTS = 1 << 23
STATE_KEYS = ("exp_avg", "exp_avg_sq")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The plain model's decay groups; parameters flagged `embedding` (vocab-parallel and tied
    embedding copies) are undecayed like `nn.Embedding` weights."""
    decay, no_decay = plain_parameter_groups(model, weight_decay)
    moved = [p for p in decay["params"] if getattr(p, "embedding", False)]
    decay["params"] = [p for p in decay["params"] if not getattr(p, "embedding", False)]
    no_decay["params"] = no_decay["params"] + moved
    return [decay, no_decay]


def all_reduce_coalesced(tensors: list[torch.Tensor], axis: Axis) -> None:
    """Sum tensors in place over `axis`, a few flattened buckets at a time."""
    if axis.size == 1:
        return
    bucket: list[torch.Tensor] = []
    for index, tensor in enumerate(tensors):
        bucket.append(tensor)
        if index + 1 == len(tensors) or sum(t.numel() for t in bucket) >= BUCKET_ELEMENTS:
            flat = axis.all_reduce(torch.cat([t.reshape(-1) for t in bucket]))
            for t, part in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
                t.copy_(part.view_as(t))
            bucket = []


def counts_in_norm(param: nn.Parameter, topo: Topology) -> bool:
    """Whether this rank's copy of `param` enters the global gradient norm."""
    if getattr(param, "norm_duplicate", False):
        return False
    return getattr(param, "tp_dim", None) is not None or topo.tp_axis.rank == 0


class _GradBuckets:
    """Gradients as views into flat buffers, all-reduced over dp bucket by bucket, each as soon
    as the armed number of backward passes has accumulated into all of its parameters."""

    def __init__(self, params: list[nn.Parameter], axis: Axis, bucket_elements: int):
        self.axis = axis
        self.buckets: list[tuple[list[nn.Parameter], torch.Tensor]] = []
        pending: list[nn.Parameter] = []
        for index, param in enumerate(reversed(params)):  # backward reaches late layers first
            pending.append(param)
            if index + 1 == len(params) or sum(p.numel() for p in pending) >= bucket_elements:
                self.buckets.append((pending, self._flat_views(pending)))
                pending = []
        self.bucket_of = {id(p): i for i, (ps, _) in enumerate(self.buckets) for p in ps}
        self.passes, self.reduced = 0, False
        self.seen: dict[int, int] = {}
        self.work: dict[int, dist.Work] = {}
        for param in params:
            param.register_post_accumulate_grad_hook(self._on_gradient)

    @staticmethod
    def _flat_views(params: list[nn.Parameter]) -> torch.Tensor:
        flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype,
                           device=params[0].device)
        for param, view in zip(params, flat.split([p.numel() for p in params]), strict=True):
            param.grad = view.view_as(param)
        return flat

    def zero(self) -> None:
        self.reduced = False
        for params, flat in self.buckets:
            flat.zero_()
            for param, view in zip(params, flat.split([p.numel() for p in params]),
                                   strict=True):
                param.grad = view.view_as(param)  # restore views someone may have replaced

    def start(self, passes: int) -> None:
        self.passes, self.reduced, self.seen, self.work = passes, False, {}, {}

    def _launch(self, index: int) -> None:
        flat = self.buckets[index][1]
        self.axis.count("all_reduce", 2 * flat.numel() * (self.axis.size - 1) / self.axis.size)
        self.work[index] = dist.all_reduce(flat, group=self.axis.group, async_op=True)

    def _on_gradient(self, param: nn.Parameter) -> None:
        if not self.passes:
            return
        self.seen[id(param)] = self.seen.get(id(param), 0) + 1
        index = self.bucket_of[id(param)]
        params = self.buckets[index][0]
        if all(self.seen.get(id(p), 0) == self.passes for p in params):
            self._launch(index)

    def finish(self) -> None:
        """Start the buckets still waiting (or all, when nothing was armed) and wait."""
        for index in range(len(self.buckets)):
            if index not in self.work:
                self._launch(index)
        for work in self.work.values():
            self.axis.wait(work)
        self.passes, self.reduced, self.seen, self.work = 0, True, {}, {}


class _FlatShard:
    """ZeRO-1 for one parameter group, without copies: the parameters and their gradients live
    as views in two flat buffers (zero-padded to a multiple of dp), and this rank's slice of
    the parameter buffer is the tensor AdamW updates (`shard`, whose gradient is the
    reduce-scattered slice of the gradient buffer)."""

    def __init__(self, params: list[nn.Parameter], topo: Topology):
        self.params, self.axis = params, topo.dp_axis
        self.sizes = [p.numel() for p in params]
        self.length = math.ceil(sum(self.sizes) / self.axis.size)
        self.start = self.axis.rank * self.length
        first = params[0]
        self.flat = torch.zeros(self.length * self.axis.size, dtype=first.dtype,
                                device=first.device)
        self.grad_flat = torch.zeros_like(self.flat)
        self.norm_weights = torch.zeros(self.length, dtype=first.dtype, device=first.device)
        offset = 0
        with torch.no_grad():
            for param, size in zip(params, self.sizes, strict=True):
                view = self.flat[offset:offset + size].view_as(param)
                view.copy_(param)
                param.data = view
                lo, hi = max(offset, self.start), min(offset + size, self.start + self.length)
                if lo < hi:
                    self.norm_weights[lo - self.start:hi - self.start] = float(
                        counts_in_norm(param, topo))
                offset += size
        self.shard = nn.Parameter(self.flat[self.start:self.start + self.length])
        self.shard.grad = torch.zeros_like(self.shard)
        self.zero_grad()

    def zero_grad(self) -> None:
        """Zero the gradient buffer and point every gradient back at its view."""
        self.grad_flat.zero_()
        offset = 0
        for param, size in zip(self.params, self.sizes, strict=True):
            param.grad = self.grad_flat[offset:offset + size].view_as(param)
            offset += size

    def reduce_grads(self) -> None:
        """Sum the gradients over dp onto this rank's slice."""
        self.shard.grad = self.axis.reduce_scatter(self.grad_flat, 0, out=self.shard.grad)

    @torch.no_grad()
    def gather_params(self) -> None:
        """Give every rank the slices the others updated (all-gather into the buffer)."""
        if self.axis.size == 1:
            return
        self.axis.count("all_gather", self.length * (self.axis.size - 1))
        dist.all_gather(list(self.flat.chunk(self.axis.size)), self.shard.detach().clone(),
                        group=self.axis.group)


class ParallelOptimizer:
    """AdamW for this rank's part of a parallelized model (see the module docstring)."""

    def __init__(self, model: nn.Module, topo: Topology, cfg: TrainConfig,
                 distributed: bool = False, bucket_elements: int = BUCKET_ELEMENTS):
        self.model, self.topo, self.distributed = model, topo, distributed
        groups = [g for g in parameter_groups(model, cfg.weight_decay) if g["params"]]
        self.params = [p for g in groups for p in g["params"]]
        self.shards = [_FlatShard(g["params"], topo) for g in groups] if distributed else []
        self.buckets = (_GradBuckets(self.params, topo.dp_axis, bucket_elements)
                        if topo.dp > 1 and not distributed else None)
        if distributed:
            groups = [{**g, "params": [s.shard]} for g, s in zip(groups, self.shards, strict=True)]
        elif not self.buckets:  # gradients, like the moments, exist before the first step
            for param in self.params:
                param.grad = torch.zeros_like(param)
        self.optimizer = FusedAdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                    eps=cfg.adam_eps)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients in place (or the flat buffers they live in): they keep their
        memory from step to step instead of being freed and allocated again, which fragments
        the heap."""
        if self.buckets:
            self.buckets.zero()
        elif self.shards:
            for shard in self.shards:
                shard.zero_grad()
        else:
            for param in self.params:
                param.grad.zero_()

    def start_backward(self, passes: int) -> None:
        """Overlap the dp all-reduce with the backward: each parameter gets `passes` gradient
        accumulations (one per micro-batch) this step."""
        if self.buckets:
            self.buckets.start(passes)

    def finish_backward(self) -> None:
        """Wait for the overlapped all-reduces (before anyone reads or scales gradients)."""
        if self.buckets and self.buckets.passes:
            self.buckets.finish()

    def reduce_gradients(self) -> None:
        topo = self.topo
        all_reduce_coalesced([p.grad for p in self.params
                              if getattr(p, "sequence_parallel", False)], topo.tp_axis)
        all_reduce_coalesced([p.grad for p in self.params
                              if getattr(p, "tied_embedding", False)], topo.embed_axis)
        if self.distributed:
            for shard in self.shards:
                shard.reduce_grads()
        elif self.buckets and not self.buckets.reduced:
            self.buckets.finish()

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip all gradients to a global L2 norm of `max_norm` (0: no clipping); return the
        pre-clip norm, identical on every rank."""
        if self.distributed:
            grads = [s.shard.grad for s in self.shards]
            squares = [(_wide(s.shard.grad) ** 2 * s.norm_weights).sum() for s in self.shards]
            axis = self.topo.world_axis
        else:
            grads = [p.grad for p in self.params]
            squares = [(_wide(p.grad) ** 2).sum() for p in self.params
                       if counts_in_norm(p, self.topo)]
            axis = self.topo.mp_axis
        total = torch.zeros((), dtype=torch.float64, device=self.topo.device)
        for square in squares:
            total += square.double()
        norm = math.sqrt(axis.all_reduce(total).item())
        if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
            torch._foreach_mul_(grads, max_norm / (norm + 1e-6))
        return norm

    def step(self) -> None:
        self.optimizer.step()
        for shard in self.shards:
            shard.gather_params()

    # ------------------------------------------------------------------ layout-free state

    def adam_steps(self) -> int | None:
        """AdamW's step count (the same for every tensor), None before the first step."""
        return self.optimizer.steps() or None

    def _pieces(self):
        """(key suffix name, param, flat start, flat stop, state owner, offset in owner) of each
        stretch of optimizer state this rank holds, with plain-model names."""
        names = {id(p): stored_name(n, self.model.config)
                 for n, p in self.model.named_parameters()}
        if not self.distributed:
            for param in self.params:
                yield names[id(param)], param, 0, param.numel(), param, 0
            return
        for shard in self.shards:
            offset = 0
            for param, size in zip(shard.params, shard.sizes, strict=True):
                lo = max(offset, shard.start)
                hi = min(offset + size, shard.start + shard.length)
                if lo < hi:
                    yield (names[id(param)], param, lo - offset, hi - offset, shard.shard,
                           lo - shard.start)
                offset += size

    def write_state(self, writer: ShardWriter) -> None:
        """Add this rank's AdamW moments to `writer` as boxes of the plain model's tensors
        (dp replicas and tp-replicated copies are written once, tied head copies never)."""
        if self.adam_steps() is None:
            return
        topo = self.topo
        for name, param, lo, hi, owner, at in self._pieces():
            replicated = getattr(param, "tp_dim", None) is None
            if (replicated and topo.tp_axis.rank) or (not self.distributed and topo.dp_axis.rank):
                continue
            if getattr(param, "norm_duplicate", False):  # the last stage's tied head copy
                continue
            full_shape, valid = shard_box(param, topo.tp_axis)
            state = self.optimizer.state[owner]
            for key in STATE_KEYS:
                flat = state[key].reshape(-1)[at:at + hi - lo]
                done = 0
                for box in flat_range_boxes(tuple(param.shape), lo, hi):
                    size = math.prod(box_shape(box))
                    piece = flat[done:done + size].view(box_shape(box))
                    done += size
                    clipped = _to_global(box, piece, param, valid)
                    if clipped is not None:
                        writer.add(f"{key}/{name}", full_shape, *clipped)

    @torch.no_grad()
    def read_state(self, store: TensorStore, adam_steps: int | None) -> None:
        """Load the AdamW moments of this rank's part from a checkpoint written under any
        layout (`write_state`); `adam_steps` None means the checkpoint has none."""
        self.optimizer.reset()
        if adam_steps is None:
            return
        for name, param, lo, hi, owner, at in self._pieces():
            full_shape, valid = shard_box(param, self.topo.tp_axis)
            state = self.optimizer.state[owner]
            for key in STATE_KEYS:
                local = torch.zeros(param.shape, dtype=owner.dtype, device=owner.device)
                part = store.read(f"{key}/{name}", valid)
                local[tuple(slice(0, n) for n in part.shape)] = part
                state[key].view(-1)[at:at + hi - lo] = local.view(-1)[lo:hi]
        for state in self.optimizer.state.values():
            state["step"].fill_(float(adam_steps))


def _to_global(box, piece: torch.Tensor, param: nn.Parameter, valid):
    """A box of the local tensor -> (its box in the full tensor, the data), tp padding cut off;
    None when the box lies in the padding."""
    dim = getattr(param, "tp_dim", None)
    if dim is None:
        return box, piece
    offset, stop = valid[dim][0], valid[dim][1]
    lo, hi = box[dim][0] + offset, min(box[dim][1] + offset, stop)
    if lo >= hi:
        return None
    piece = piece.narrow(dim, 0, hi - lo)
    return tuple((lo, hi) if d == dim else b for d, b in enumerate(box)), piece


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))
