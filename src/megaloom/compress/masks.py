"""Which weights are pruned, and magnitude masks that do not depend on the layout.

A target is named by the module it belongs to (`qkv`, `proj`, `up`, `gate`, `down`, `embed`,
`lm_head`) and matched on the plain model's stored name, so a tied head is the embedding and
norms, biases and position embeddings are never targets. A mask keeps the entries whose
magnitude is above the `k`-th smallest of the whole (unsharded) tensor: each tp rank
contributes its real entries to that order statistic, so a shard's mask is the slice of the
one-process mask whenever the weights are equal.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from megaloom.checkpoint.shards import stored_name
from megaloom.model.gpt import GPT
from megaloom.parallel.build import real_part
from megaloom.parallel.layers import shard_box
from megaloom.parallel.topology import Axis

_PROJECTION = re.compile(r"^layers\.(\d+)\.(?:attn|mlp)\.(qkv|proj|up|gate|down)\.weight$")
_WHOLE = {"embed.weight": "embed", "lm_head.weight": "lm_head"}


def target_of(key: str) -> str | None:
    """The target name a stored tensor belongs to (None: never pruned)."""
    match = _PROJECTION.match(key)
    return match.group(2) if match else _WHOLE.get(key)


def layer_of(key: str) -> str:
    """The group a stored tensor is reported under: its layer index, or `embed`/`lm_head`."""
    match = _PROJECTION.match(key)
    return match.group(1) if match else _WHOLE[key]


def pruned_parameters(model: GPT, targets: list[str]) -> dict[str, nn.Parameter]:
    """This rank's parameters to prune, by stored name. The last pipeline stage's copy of a
    tied embedding holds the embedding's values, so its own mask is the embedding's."""
    return {key: param for name, param in model.named_parameters()
            if target_of(key := stored_name(name, model.config)) in targets}


def local_real(tensor: torch.Tensor, param: nn.Parameter, axis: Axis) -> torch.Tensor:
    """The part of `tensor` (shaped like this rank's `param`) that is not tp padding."""
    return real_part(tensor, shard_box(param, axis)[1])


@torch.no_grad()
def magnitude_mask(param: nn.Parameter, sparsity: float, axis: Axis) -> torch.Tensor:
    """A bool mask of `param`'s local shape keeping entries above the `round(sparsity * n)`-th
    smallest magnitude of the full tensor (n entries over the tp group; padding is kept out
    of the order statistic and masked)."""
    full_shape, _ = shard_box(param, axis)
    pruned = round(sparsity * math.prod(full_shape))
    mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
    magnitude = local_real(param, param, axis).abs()
    if pruned == 0:
        local_real(mask, param, axis).fill_(True)
        return mask
    values = torch.full(param.shape, math.inf, dtype=torch.float32, device=param.device)
    local_real(values, param, axis).copy_(magnitude)
    values = values.flatten()
    if getattr(param, "tp_dim", None) is not None:
        values = axis.all_gather(values, 0)
    threshold = torch.kthvalue(values, pruned).values
    local_real(mask, param, axis).copy_(magnitude > threshold)
    return mask
