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
   parameter once and a tied embedding once, with the same clipping rule as
   `megaloom.train.precision.clip_grad_norm`. Every rank gets the same value, so an fp16
   overflow (a non-finite norm) is agreed by all ranks.
3. `step()`: AdamW on local parameters, or on the local shard followed by an all-gather of
   the updated parameters (ZeRO-1). Weight decay groups follow `train.optim.parameter_groups`.

State dicts are converted to the plain single-process model's AdamW format
so optimizer checkpoints are independent of the layout.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megaloom.config import ModelConfig, TrainConfig
from megaloom.model.gpt import GPT
from megaloom.parallel.parallelize import gather_full, local_slice
from megaloom.parallel.topology import Axis, Topology
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
            work.wait()
        self.passes, self.reduced, self.seen, self.work = 0, True, {}, {}


class _FlatShard:
    """A parameter group flattened (zero-padded to a multiple of dp) and this rank's slice."""

    def __init__(self, params: list[nn.Parameter], topo: Topology):
        self.params, self.axis = params, topo.dp_axis
        self.sizes = [p.numel() for p in params]
        self.length = math.ceil(sum(self.sizes) / self.axis.size)
        self.start = self.axis.rank * self.length
        self.shard = nn.Parameter(self.local([p.detach() for p in params]).clone())
        weights = [torch.full_like(p, float(counts_in_norm(p, topo))) for p in params]
        self.norm_weights = self.local(weights)

    def flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return nn.functional.pad(flat, (0, self.length * self.axis.size - flat.numel()))

    def local(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return self.flatten(tensors)[self.start:self.start + self.length]

    def unflatten(self, shard: torch.Tensor) -> list[torch.Tensor]:
        """All-gather shard-shaped data and split it into parameter-shaped tensors."""
        flat = self.axis.all_gather(shard.detach(), 0)[:sum(self.sizes)]
        return [t.view_as(p) for t, p in zip(flat.split(self.sizes), self.params, strict=True)]

    def reduce_grads(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.shard.grad = self.axis.reduce_scatter(self.flatten(grads), 0)

    @torch.no_grad()
    def gather_params(self) -> None:
        for param, value in zip(self.params, self.unflatten(self.shard), strict=True):
            param.copy_(value)


class ParallelOptimizer:
    """AdamW for this rank's part of a parallelized model (see the module docstring)."""

    def __init__(self, model: nn.Module, topo: Topology, cfg: TrainConfig,
                 distributed: bool = False, bucket_elements: int = BUCKET_ELEMENTS):
        self.model, self.topo, self.distributed = model, topo, distributed
        groups = parameter_groups(model, cfg.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        self.shards = [_FlatShard(g["params"], topo) for g in groups] if distributed else []
        self.buckets = (_GradBuckets(self.params, topo.dp_axis, bucket_elements)
                        if topo.dp > 1 and not distributed else None)
        if distributed:
            groups = [{**g, "params": [s.shard]} for g, s in zip(groups, self.shards, strict=True)]
        self.optimizer = torch.optim.AdamW(  # fused, like `train.optim.build_optimizer`
            groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps, fused=True)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop gradients (or zero the dp buckets they live in)."""
        if self.buckets:
            self.buckets.zero()
            return
        for param in self.params + [s.shard for s in self.shards]:
            param.grad = None

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
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
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

    @torch.no_grad()
    def refresh_shards(self) -> None:
        """Copy the parameters into the ZeRO shards (after loading weights into the model)."""
        for shard in self.shards:
            shard.shard.copy_(shard.local([p.detach() for p in shard.params]))

    def step(self) -> None:
        self.optimizer.step()
        for shard in self.shards:
            shard.gather_params()

    # ------------------------------------------------------------------ layout-free state

    def _state_by_name(self) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor | None]:
        names = {id(p): n for n, p in self.model.named_parameters()}
        by_key: dict[str, dict[str, torch.Tensor]] = {k: {} for k in STATE_KEYS}
        step = None
        owners = self.shards if self.distributed else [None]
        for shard in owners:
            sources = [shard.shard] if shard else self.params
            for source in sources:
                state = self.optimizer.state.get(source)
                if not state:
                    continue
                step = state["step"]
                for key in STATE_KEYS:
                    values = shard.unflatten(state[key]) if shard else [state[key]]
                    params = shard.params if shard else [source]
                    for param, value in zip(params, values, strict=True):
                        by_key[key][names[id(param)]] = value
        return by_key, step

    def state_dict(self, config: ModelConfig) -> dict | None:
        """The plain single-process model's AdamW state dict, on global rank 0 (None
        elsewhere). Every rank must call it."""
        by_key, step = self._state_by_name()
        has_state = torch.tensor([float(step is not None)], device=self.topo.device)
        self.topo.world_axis.all_reduce(has_state, op=dist.ReduceOp.MIN)
        full = {k: gather_full(v, self.model, self.topo) for k, v in by_key.items()}
        if self.topo.rank != 0:
            return None
        order = plain_order(config, self.optimizer.param_groups)
        state = {}
        if has_state.item():
            for index, name in enumerate(n for group in order for n in group):
                state[index] = {"step": step.detach().cpu().clone(),
                                **{k: full[k][name] for k in STATE_KEYS}}
        groups, start = [], 0
        for group, names in zip(self.optimizer.param_groups, order, strict=True):
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + len(names)))})
            start += len(names)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, full: dict, config: ModelConfig) -> None:
        """Load a plain-model AdamW state dict (as `state_dict` writes) into this layout."""
        order = plain_order(config, full["param_groups"])
        flat_names = [n for group in order for n in group]
        by_name = {name: full["state"].get(i) for i, name in enumerate(flat_names)}
        tied = config.tie_embeddings
        local: dict = {"state": {}, "param_groups": []}
        names = {id(p): n for n, p in self.model.named_parameters()}
        groups = self.shards if self.distributed else [None] * len(self.optimizer.param_groups)
        index = 0
        for saved, inner, shard in zip(full["param_groups"], self.optimizer.param_groups,
                                       groups, strict=True):
            params = shard.params if shard else inner["params"]
            per_param = []
            for param in params:
                name = names[id(param)]
                name = "embed.weight" if tied and name == "lm_head.weight" else name
                per_param.append(by_name[name])
            ids = list(range(index, index + len(inner["params"])))
            if all(s is not None for s in per_param):
                slices = {k: [local_slice(s[k], p, self.topo.tp_axis)
                              for s, p in zip(per_param, params, strict=True)]
                          for k in STATE_KEYS}
                step = per_param[0]["step"]
                if shard:
                    local["state"][index] = {"step": step.clone(), **{k: shard.local(v)
                                                             for k, v in slices.items()}}
                else:
                    for offset in range(len(params)):
                        local["state"][index + offset] = {
                            "step": step.clone(), **{k: v[offset] for k, v in slices.items()}}
            local["param_groups"].append({**saved, "params": ids})
            index += len(ids)
        self.optimizer.load_state_dict(local)


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def plain_order(config: ModelConfig, groups: list[dict]) -> list[list[str]]:
    """Parameter names of the plain `GPT`, per AdamW group, in `train.optim` order."""
    with torch.device("meta"):
        plain = GPT(config)
    names = {id(p): n for n, p in plain.named_parameters()}
    decay = groups[0]["weight_decay"] if groups else 0.0
    return [[names[id(p)] for p in g["params"]] for g in plain_parameter_groups(plain, decay)]
