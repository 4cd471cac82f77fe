"""Structured pruning (`megaloom prune --structured`): remove whole kv groups of attention heads,
MLP channels and layers, and write a smaller dense model with a rewritten config.

Importance comes from one pass of the dense model over calibration windows (the
activation-based scores of Minitron, Muralidharan et al. 2024; layers by ShortGPT's Block
Influence, Men et al. 2024):

- a head's score is the L2 norm, over all calibration tokens, of its contribution to the
  attention output (its slice of the attention values times its columns of `proj`); a kv group
  scores the sum of its query heads, and whole groups are removed, so grouped-query attention
  keeps its shape;
- an MLP channel's score is the L2 norm of its contribution to the MLP output
  (||a_j||_2 over tokens times ||down[:, j]||_2);
- a layer's score is its Block Influence, the mean over tokens of 1 - cos(input, output).

Every layer keeps the same number of heads and channels (the lowest-scoring ones go, layer by
layer), because a config, like Hugging Face's, has one width per model. A part whose
contribution is exactly zero scores zero and goes first, so removing it changes no logit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from megaloom.config import ModelConfig
from megaloom.errors import MegaloomError
from megaloom.model.gpt import GPT, Attention, Block


@dataclass(frozen=True)
class Widths:
    """What every layer keeps: query heads, MLP channels, and how many layers survive."""

    layers: int
    heads: int
    ffn: int

    @classmethod
    def resolve(cls, config: ModelConfig, layers: int | None, heads: int | None,
                ffn: int | None) -> Widths:
        """The requested widths (None: unchanged), checked against `config`."""
        widths = cls(config.num_layers if layers is None else layers,
                     config.num_heads if heads is None else heads,
                     config.ffn_hidden_size if ffn is None else ffn)
        q_per_kv = config.num_heads // config.num_kv_heads
        checks = [(1 <= widths.layers <= config.num_layers, "--layers",
                   f"between 1 and model.num_layers={config.num_layers}"),
                  (1 <= widths.heads <= config.num_heads and widths.heads % q_per_kv == 0,
                   "--heads", f"a multiple of {q_per_kv} (query heads per kv group; whole "
                              f"groups are removed) between 1 and {config.num_heads}"),
                  (1 <= widths.ffn <= config.ffn_hidden_size, "--ffn",
                   f"between 1 and model.ffn_hidden_size={config.ffn_hidden_size}")]
        for ok, flag, expected in checks:
            if not ok:
                raise MegaloomError(f"{flag} must be {expected}, got {getattr(widths, flag[2:])}")
        if widths == cls(config.num_layers, config.num_heads, config.ffn_hidden_size):
            raise MegaloomError("--structured needs at least one of --layers, --heads, --ffn "
                                "below the model's own width")
        return widths

    def config(self, config: ModelConfig) -> ModelConfig:
        """`config` at these widths (head_dim kept, so fewer heads narrow the attention)."""
        q_per_kv = config.num_heads // config.num_kv_heads
        return dataclasses.replace(config, num_layers=self.layers, num_heads=self.heads,
                                   num_kv_heads=self.heads // q_per_kv,
                                   head_dim=config.head_dim, ffn_hidden_size=self.ffn,
                                   init_from=None)


@dataclass
class Importance:
    """Scores of every layer (Block Influence), kv group and MLP channel, per layer."""

    layers: torch.Tensor  # (layers,)
    groups: torch.Tensor  # (layers, kv groups)
    channels: torch.Tensor  # (layers, ffn)


@torch.no_grad()
def importance(model: GPT, windows: Sequence[torch.Tensor], batch_size: int = 8) -> Importance:
    """Scores from one forward pass of `model` over `windows` (hooks on every block)."""
    cfg = model.config
    blocks = [model.layers[str(i)] for i in range(cfg.num_layers)]
    heads = torch.zeros(cfg.num_layers, cfg.num_heads, dtype=torch.float64)
    channels = torch.zeros(cfg.num_layers, cfg.ffn_hidden_size, dtype=torch.float64)
    influence = torch.zeros(cfg.num_layers, dtype=torch.float64)
    tokens = 0

    def head_hook(index: int, attn: Attention):
        def record(_module, inputs):
            values = inputs[0].reshape(-1, cfg.num_heads, cfg.head_dim).double()
            weight = attn.proj.weight.double().reshape(-1, cfg.num_heads, cfg.head_dim)
            contribution = torch.einsum("thd,ohd->tho", values, weight)
            heads[index] += contribution.square().sum(dim=(0, 2))
        return record

    def channel_hook(index: int, down: nn.Linear):
        def record(_module, inputs):
            a = inputs[0].reshape(-1, cfg.ffn_hidden_size).double()
            channels[index] += a.square().sum(0) * down.weight.double().square().sum(0)
        return record

    def block_hook(index: int):
        def record(_module, inputs, output):
            x = inputs[0].reshape(-1, cfg.hidden_size).double()
            y = output.reshape(-1, cfg.hidden_size).double()
            influence[index] += (1 - nn.functional.cosine_similarity(x, y, dim=-1)).sum()
        return record

    handles = []
    for i, block in enumerate(blocks):
        handles += [block.attn.proj.register_forward_pre_hook(head_hook(i, block.attn)),
                    block.mlp.down.register_forward_pre_hook(channel_hook(i, block.mlp.down)),
                    block.register_forward_hook(block_hook(i))]
    try:
        model.eval()
        for start in tqdm(range(0, len(windows), batch_size), desc="calibrate", unit="batch"):
            batch = torch.stack(list(windows[start:start + batch_size]))
            model(batch)
            tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    q_per_kv = cfg.num_heads // cfg.num_kv_heads
    groups = heads.sqrt().reshape(cfg.num_layers, cfg.num_kv_heads, q_per_kv).sum(-1)
    return Importance(influence / tokens, groups, channels.sqrt())


def _best(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, in ascending index order (ties: lower index)."""
    order = torch.sort(-scores, stable=True).indices[:count]
    return order.sort().values


@torch.no_grad()
def shrink(model: GPT, widths: Widths, scores: Importance) -> tuple[GPT, dict]:
    """A new, smaller `GPT` keeping the best-scoring parts of `model`, and what was kept."""
    cfg = model.config
    new_cfg = widths.config(cfg)
    layers = _best(scores.layers, widths.layers)
    kept_groups = new_cfg.num_kv_heads
    small = GPT(new_cfg).to(next(model.parameters()).dtype)
    for name in ("embed", "pos_embed", "final_norm", "lm_head"):
        if getattr(model, name) is not None:
            getattr(small, name).load_state_dict(getattr(model, name).state_dict())
    kept: dict = {"layers": layers.tolist(), "kv_groups": {}, "channels": {}}
    for new_index, old_index in enumerate(layers.tolist()):
        groups = _best(scores.groups[old_index], kept_groups)
        channels = _best(scores.channels[old_index], widths.ffn)
        _copy_block(model.layers[str(old_index)], small.layers[str(new_index)], cfg, groups,
                    channels)
        kept["kv_groups"][str(old_index)] = groups.tolist()
        kept["channels"][str(old_index)] = channels.tolist()
    return small.eval(), kept


def _copy_block(old: Block, new: Block, cfg: ModelConfig, groups: torch.Tensor,
                channels: torch.Tensor) -> None:
    """Copy `old`'s norms and the kept kv groups and MLP channels into `new`."""
    new.attn_norm.load_state_dict(old.attn_norm.state_dict())
    new.mlp_norm.load_state_dict(old.mlp_norm.state_dict())
    q_per_kv, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    # qkv rows are laid out group by group: q_per_kv query heads, then one key and one value
    qkv_rows = old.attn.qkv.weight.reshape(cfg.num_kv_heads, -1, cfg.hidden_size)
    new.attn.qkv.weight.copy_(qkv_rows[groups].reshape(-1, cfg.hidden_size))
    if old.attn.qkv.bias is not None:
        new.attn.qkv.bias.copy_(old.attn.qkv.bias.reshape(cfg.num_kv_heads, -1)[groups]
                                .flatten())
    proj_columns = old.attn.proj.weight.reshape(cfg.hidden_size, cfg.num_kv_heads, q_per_kv * d)
    new.attn.proj.weight.copy_(proj_columns[:, groups].reshape(cfg.hidden_size, -1))
    for name in ("up", "gate"):
        source = getattr(old.mlp, name)
        if source is not None:
            target = getattr(new.mlp, name)
            target.weight.copy_(source.weight[channels])
            if source.bias is not None:
                target.bias.copy_(source.bias[channels])
    new.mlp.down.weight.copy_(old.mlp.down.weight[:, channels])
    for source, target in ((old.attn.proj, new.attn.proj), (old.mlp.down, new.mlp.down)):
        if source.bias is not None:  # output biases stay whole
            target.bias.copy_(source.bias)


def prune_structured(model: GPT, widths: Widths, windows: Sequence[torch.Tensor]
                     ) -> tuple[GPT, dict]:
    """The smaller model and its report (widths, parameters before and after, what was kept,
    the scores)."""
    if not windows:
        raise MegaloomError("--structured needs --calibration text (activation importance)")
    scores = importance(model, windows)
    small, kept = shrink(model, widths, scores)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in small.parameters())
    return small, {"method": "structured", "importance": "activation (Minitron), block "
                   "influence (ShortGPT)", "widths": dataclasses.asdict(widths),
                   "parameters": {"before": before, "after": after, "ratio": after / before},
                   "kept": kept, "calibration_windows": len(windows),
                   "scores": {"layers": scores.layers.tolist(),
                              "kv_groups": scores.groups.tolist()}}
