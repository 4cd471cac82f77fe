"""Layout-independent initial weights: any slice of any parameter, drawn on its own.

A parameter's initial values are a pure function of the run seed, its plain-model name and its
full shape, so a tensor-parallel or pipeline rank draws exactly its own slice and gets the
values the single-process model has there (the parity oracle holds for every layout).

The full tensor is cut along dim 0 into blocks of whole rows of at most `BLOCK_ELEMENTS`
elements (a function of the shape alone); block `i` comes from a generator seeded by
(seed, name, i). A slice draws only the blocks its rows touch, so building a rank's shard peaks
at the shard plus one block, whether the rank owns rows (column- and vocab-parallel weights) or
columns (row-parallel weights). Megatron draws each full parameter on the CPU and slices it;
blocks bound the peak below the largest parameter as well (MT-NLG's embedding is 4 GB in fp32).

Values follow GPT-2/Megatron: N(0, init_std) for matrices and embeddings, init_std /
sqrt(2 * num_layers) for the residual projections (`attn.proj`, `mlp.down`), zero biases, unit
norm weights, and zero rows for the padded vocabulary of the token embedding. LoRA factors:
`lora_A` N(0, 1/sqrt(in)), `lora_B` zeros (an untrained adapter changes nothing).

T5 (`model.arch=t5`) follows its own scheme (Mesh TensorFlow's, as `transformers` has it):
the embedding and an untied head N(0, 1), every projection N(0, fan_in^-1/2) except queries,
whose N(0, (hidden * head_dim)^-1/2) absorbs the attention scaling T5 leaves out; in the fused
`qkv` the query rows are rescaled by head_dim^-1/2, a function of the row index alone.
"""

from __future__ import annotations

import hashlib
import math

import torch

from megaloom.config import ModelConfig

BLOCK_ELEMENTS = 1 << 22
RESIDUAL_PROJECTIONS = ("attn.proj.weight", "mlp.down.weight")

Box = tuple[tuple[int, int], ...]  # (start, stop) per dimension


def full_box(shape: tuple[int, ...] | torch.Size) -> Box:
    return tuple((0, size) for size in shape)


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_rule(name: str, config: ModelConfig, shape: tuple[int, ...] = ()) -> float | str:
    """'zeros', 'ones', or the standard deviation of the normal draw for parameter `name` of
    full `shape`."""
    if name.endswith((".bias", ".lora_B")):
        return "zeros"
    if name.endswith(".lora_A"):
        return 1.0 / math.sqrt(shape[1])
    if "norm." in name:
        return "ones"
    if config.arch == "t5":
        return t5_std(name, config)
    if name.endswith(RESIDUAL_PROJECTIONS):
        return config.init_std / math.sqrt(2.0 * config.num_layers)
    return config.init_std


def t5_std(name: str, config: ModelConfig) -> float:
    """T5's standard deviation of weight `name` (queries before their head_dim^-1/2)."""
    hidden, inner = config.hidden_size, config.num_heads * config.head_dim
    if name in ("embed.weight", "lm_head.weight"):
        return 1.0
    if name.endswith("attn.proj.weight"):
        return inner ** -0.5
    if name.endswith("mlp.down.weight"):
        return config.ffn_hidden_size ** -0.5
    if name.endswith("cross_attn.q.weight"):
        return (hidden * config.head_dim) ** -0.5
    return hidden ** -0.5  # fused qkv, cross-attention k/v, MLP inputs, position tables


def _scale_t5_queries(out: torch.Tensor, rows: tuple[int, int], config: ModelConfig) -> None:
    """Rescale the query rows of a box of a fused `qkv` weight by head_dim^-1/2."""
    d = config.head_dim
    q_rows = config.num_heads // config.num_kv_heads * d
    index = torch.arange(*rows)
    out[index % (q_rows + 2 * d) < q_rows] *= d ** -0.5


def initial_values(name: str, shape: tuple[int, ...] | torch.Size, config: ModelConfig,
                   seed: int, box: Box | None = None) -> torch.Tensor:
    """The fp32 initial values of `box` (default: all) of parameter `name` of full `shape`."""
    shape = tuple(shape)
    box = full_box(shape) if box is None else box
    rule = init_rule(name, config, shape)
    if rule == "zeros":
        return torch.zeros(box_shape(box))
    if rule == "ones":
        return torch.ones(box_shape(box))
    (row_start, row_stop), rest = box[0], box[1:]
    row_numel = math.prod(shape[1:])
    block_rows = max(1, BLOCK_ELEMENTS // max(1, row_numel))
    pieces = [torch.empty(0, *box_shape(rest))]
    for block in range(row_start // block_rows, -(-row_stop // block_rows)):
        low, high = block * block_rows, min((block + 1) * block_rows, shape[0])
        generator = torch.Generator().manual_seed(block_seed(seed, name, block))
        values = torch.empty(high - low, *shape[1:]).normal_(0.0, rule, generator=generator)
        values = values[max(row_start, low) - low:min(row_stop, high) - low]
        for dim, (start, stop) in enumerate(rest, start=1):
            values = values.narrow(dim, start, stop - start)
        pieces.append(values)
    out = torch.cat(pieces)
    if config.arch == "t5" and name.endswith("attn.qkv.weight"):
        _scale_t5_queries(out, (row_start, row_stop), config)
    if name == "embed.weight" and row_stop > config.vocab_size:  # padding ids embed to zero
        out[max(0, config.vocab_size - row_start):] = 0.0
    return out
