"""LoRA (Hu et al. 2021): a frozen model plus trained low-rank updates `scale * B @ A`.

`apply_lora` adds `lora_A` (rank x in) and `lora_B` (out x rank) to each targeted projection
of this rank's shard, freezes every other parameter but a classifier's head (so the optimizer
holds state for the adapters, and that head, only) and adds `scale * B(A(dropout(x)))` to
the projection's output, with `scale = alpha / rank`. `B` starts at zero, so an untrained
adapter leaves the logits unchanged.

The adapters follow the tensor-parallel layer they sit on, and only small (.., rank)
activations cross ranks:

- column-parallel (`qkv`, `up`, `gate`): `A` is replicated, `B` split by output rows like
  the weight. `h = A x` is computed on the layer's own input and passed through `copy_to`
  (or, under sequence parallelism, `A` acts on the sequence shard and `h` is all-gathered),
  so the backward sums the partial gradients of `h` over tp.
- row-parallel (`proj`, `down`): `A` is split by input columns like the weight, `B`
  replicated. The partial `A_r x_r` are all-reduced (an (.., rank) tensor), then `B` applies
  (and, under sequence parallelism, the result keeps this rank's sequence shard).

Initial values are layout-independent like every weight (`megaloom.model.init`): `A` normal
with std 1/sqrt(in), `B` zeros. `merged_source` serves a checkpoint's weights with the
adapters folded in (`W + scale * B @ A`, box by box), so every reader (generate, serve,
convert, tensor-parallel inference) gets the merged model without knowing about LoRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaloom.config import GATED_ACTIVATIONS, Config, LoraConfig
from megaloom.model.init import Box, initial_values
from megaloom.parallel.layers import (
    ColumnParallelLinear,
    ForkedDropout,
    RowParallelLinear,
    shard_box,
)
from megaloom.parallel.mappings import copy_to, gather_seq, reduce_from, scatter_seq
from megaloom.parallel.random import TP_STREAM, RNGTracker
from megaloom.parallel.topology import Topology

MODULE_PATHS = {"qkv": "attn.qkv", "proj": "attn.proj", "up": "mlp.up", "gate": "mlp.gate",
                "down": "mlp.down"}


def scale(cfg: LoraConfig) -> float:
    return cfg.alpha / cfg.rank


def target_names(cfg: LoraConfig, num_layers: int, has_gate: bool) -> list[str]:
    """Plain-model names (`layers.3.mlp.up`) of every projection the adapters target."""
    return [f"layers.{i}.{MODULE_PATHS[t]}" for i in range(num_layers) for t in cfg.targets
            if t != "gate" or has_gate]


class _Adapter:
    """The forward hook adding `scale * B(A(dropout(x)))` to one projection's output."""

    def __init__(self, scale: float, dropout: nn.Module):
        self.scale, self.dropout = scale, dropout

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        x = self.dropout(args[0])
        a, b = module.lora_A, module.lora_B
        if isinstance(module, ColumnParallelLinear):
            h = F.linear(x, a)
            h = gather_seq(h, module.axis) if module.sequence_parallel else copy_to(h,
                                                                                  module.axis)
            return output + self.scale * F.linear(h, b)
        if isinstance(module, RowParallelLinear):
            h = reduce_from(F.linear(x, a), module.axis)
            delta = F.linear(h, b)
            if module.sequence_parallel:
                delta = scatter_seq(delta, module.axis)
            return output + self.scale * delta
        return output + self.scale * F.linear(F.linear(x, a), b)


@torch.no_grad()
def apply_lora(model: nn.Module, topo: Topology, cfg: LoraConfig, seed: int,
               tracker: RNGTracker | None = None) -> None:
    """Freeze this rank's shard and give every targeted projection it holds an adapter."""
    for name, param in model.named_parameters():  # a classifier's new head stays trainable
        param.requires_grad_(bool(model.config.num_labels)
                            and name.startswith(("lm_head.", "pooler.")))
    modules = dict(model.named_modules())
    has_gate = model.config.activation in GATED_ACTIVATIONS
    found = 0
    for name in target_names(cfg, model.config.num_layers, has_gate):
        module = modules.get(name)
        if module is None:  # another pipeline stage holds this layer
            continue
        found += 1
        _add_factors(module, name, topo, cfg.rank, seed, model.config)
        dropout: nn.Module = nn.Dropout(cfg.dropout)
        if cfg.dropout > 0 and topo.tp > 1 and isinstance(module, RowParallelLinear):
            if tracker is None:
                raise ValueError("LoRA dropout on tensor-parallel layers needs an RNG tracker")
            dropout = ForkedDropout(cfg.dropout, tracker, TP_STREAM)  # inputs are tp-sharded
        module.register_module("lora_dropout", dropout)
        module.register_forward_hook(_Adapter(scale(cfg), dropout))
    if found == 0 and len(model.layers):
        raise ValueError(f"task.lora.targets={cfg.targets} matched no projection")


def _add_factors(module: nn.Module, name: str, topo: Topology, rank: int, seed: int,
                 config) -> None:
    """`lora_A`/`lora_B` sharded like `module`'s weight, filled with their initial slices."""
    weight = module.weight
    out_local, in_local = weight.shape
    full_out = weight.tp_full if getattr(weight, "tp_dim", None) == 0 else out_local
    full_in = weight.tp_full if getattr(weight, "tp_dim", None) == 1 else in_local
    sharded_a = isinstance(module, RowParallelLinear)
    sharded_b = isinstance(module, ColumnParallelLinear)
    a = nn.Parameter(weight.new_zeros(rank, in_local if sharded_a else full_in))
    b = nn.Parameter(weight.new_zeros(out_local if sharded_b else full_out, rank))
    if sharded_a:
        a.tp_dim, a.tp_full = 1, full_in
    if sharded_b:
        b.tp_dim, b.tp_full = 0, full_out
    if isinstance(module, ColumnParallelLinear) and module.sequence_parallel:
        a.sequence_parallel = True  # A sees only this rank's sequence shard: partial gradient
    for key, param in (("lora_A", a), ("lora_B", b)):
        full_shape, box = shard_box(param, topo.tp_axis)
        values = initial_values(f"{name}.{key}", full_shape, config, seed, box)
        param[tuple(slice(0, size) for size in values.shape)].copy_(values)
        module.register_parameter(key, param)


class MergedSource:
    """A checkpoint's weights with its LoRA adapters folded in: `read` of a targeted weight
    returns `W[box] + scale * B[rows] @ A[:, cols]`; everything else passes through."""

    def __init__(self, checkpoint, config: Config):
        self.checkpoint = checkpoint
        cfg = config.task.lora
        model = config.model
        self.scale = scale(cfg)
        self.targets = {f"{n}.weight": n for n in target_names(
            cfg, model.num_layers, model.activation in GATED_ACTIVATIONS)}

    def read(self, name: str, shape: tuple[int, ...], box: Box) -> torch.Tensor:
        values = self.checkpoint.read(name, shape, box)
        module = self.targets.get(name)
        if module is None:
            return values
        store = self.checkpoint.store
        (row_lo, row_hi), (col_lo, col_hi) = box
        rank = store.shapes[f"{module}.lora_A"][0]
        a = store.read(f"{module}.lora_A", ((0, rank), (col_lo, col_hi)))
        b = store.read(f"{module}.lora_B", ((row_lo, row_hi), (0, rank)))
        return values + self.scale * (b.double() @ a.double()).to(values.dtype)


def merged_source(checkpoint, config: Config):
    """The checkpoint itself, or a `MergedSource` when it was trained with LoRA."""
    return MergedSource(checkpoint, config) if config.task.lora.rank > 0 else checkpoint
