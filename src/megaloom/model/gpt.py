"""The GPT decoder: GPT-2 and Llama flavours from one readable module, chosen by `ModelConfig`.

Owns the layer definitions, initialisation and the forward pass. Parallelism is applied from
outside (`megaloom.parallel`), so this file stays a plain single-device model:

- `embed` (token embedding) and `pos_embed` are optional, as are `final_norm`/`lm_head`, so a
  pipeline stage can drop what it does not own; `layers` is a `ModuleDict` keyed by the global
  layer index, so parameter names do not depend on the layout.
- Attention projects q, k and v with one fused `qkv` linear whose output columns are grouped
  per kv head, Megatron-style: for each kv group, its query heads, then its key head, then its
  value head. A contiguous split of those columns gives each tensor-parallel rank whole groups.
- Logits cover the padded vocabulary; `lm_loss` and sampling ignore the padding ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megaloom.config import GATED_ACTIVATIONS, ModelConfig
from megaloom.model.init import initial_values


@dataclass
class AttentionContext:
    """Per-forward attention inputs shared by every layer.

    `rope` holds the (cos, sin) tables of this forward's positions. `kv_cache`, when given, is
    an object with `update(layer_index, k, v) -> (k_all, v_all)` that stores the new
    keys/values (batch, kv_heads, seq, head_dim) and returns everything cached so far.
    `attn_mask` is a boolean (batch, 1, q_len, kv_len) mask where True means "may attend"; when
    None, plain causal attention over the current chunk is used (`causal`), or full
    bidirectional attention for an encoder.
    """

    kv_cache: object | None = None
    attn_mask: torch.Tensor | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    causal: bool = True


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables of shape (batch, 1, seq, head_dim) for rotate-half RoPE."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, half, device=positions.device, dtype=torch.float32)
                              / half)
    )
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (b, s, half)
    angles = torch.cat([angles, angles], dim=-1)[:, None]  # (b, 1, s, head_dim)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head attention with grouped kv heads, SDPA kernels and an optional KV cache."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.scale = config.attention_scale
        qkv_width = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.qkv = nn.Linear(config.hidden_size, qkv_width, bias=config.bias)
        self.proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size,
                              bias=config.bias)

    def forward(self, x_bsh: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        q_per_kv = self.num_heads // self.num_kv_heads
        # Groups are counted from the local weight so a tensor-parallel shard runs this code too,
        # and the shape from qkv's output (sequence parallelism gathers the sequence inside qkv).
        kv_heads = self.qkv.out_features // ((q_per_kv + 2) * self.head_dim)
        qkv = self.qkv(x_bsh)
        batch, seq = qkv.shape[:2]
        qkv = qkv.view(batch, seq, kv_heads, q_per_kv + 2, self.head_dim)
        q_bnsd = qkv[:, :, :, :q_per_kv].reshape(batch, seq, kv_heads * q_per_kv, self.head_dim)
        q_bnsd = q_bnsd.transpose(1, 2)
        k_bnsd = qkv[:, :, :, q_per_kv].transpose(1, 2)
        v_bnsd = qkv[:, :, :, q_per_kv + 1].transpose(1, 2)
        if ctx.rope is not None:
            cos, sin = ctx.rope
            q_bnsd = apply_rope(q_bnsd, cos, sin)
            k_bnsd = apply_rope(k_bnsd, cos, sin)
        if ctx.kv_cache is not None:
            k_bnsd, v_bnsd = ctx.kv_cache.update(self.layer_index, k_bnsd, v_bnsd)
        out = F.scaled_dot_product_attention(
            q_bnsd,
            k_bnsd,
            v_bnsd,
            attn_mask=ctx.attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=ctx.attn_mask is None and ctx.causal,
            scale=self.scale,
            enable_gqa=q_per_kv > 1,
        )
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return self.proj(out)


class MLP(nn.Module):
    """`down(act(up(x)))` with GELU or ReLU (T5 v1.0), or gated: SwiGLU
    (`down(silu(gate(x)) * up(x))`) and GEGLU (tanh GELU on the gate, T5 v1.1)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.activation = config.activation
        self.up = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=config.bias)
        self.gate = (
            nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=config.bias)
            if config.activation in GATED_ACTIVATIONS
            else None
        )
        self.down = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        if self.activation == "geglu":
            return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))
        if self.activation == "relu":
            return self.down(F.relu(self.up(x)))
        approximate = "tanh" if self.activation == "gelu_tanh" else "none"
        return self.down(F.gelu(self.up(x), approximate=approximate))


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


class Block(nn.Module):
    """A transformer layer. Pre-norm (`norm_position: pre`): x + attn(norm(x)), then
    x + mlp(norm(x)); post-norm (original BERT): norm(x + attn(x)), then norm(x + mlp(x))."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_index)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)
        self.post_norm = config.norm_position == "post"

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        drop = self.dropout if self.training else _unchanged  # skip the no-op call at decode
        if self.post_norm:
            x = self.attn_norm(x + drop(self.attn(x, ctx)))
            return self.mlp_norm(x + drop(self.mlp(x)))
        x = x + drop(self.attn(self.attn_norm(x), ctx))
        return x + drop(self.mlp(self.mlp_norm(x)))


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """An embedding left uninitialised (`reset_parameters` below sets every weight): on the
    `meta` device, torch's own `normal_` init would load its Python meta kernels, ~75 MB of
    modules (sympy among them) in every process that builds a shard."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class GPT(nn.Module):
    """A decoder-only transformer. `forward(tokens)` returns logits over the padded vocabulary.

    Other families (`megaloom.model.bert`) subclass it and override `build_embeddings`,
    `build_head`, `embed_inputs` and `head`; `FIRST_STAGE`/`LAST_STAGE` name the modules the
    first and last pipeline stage own, so the pipeline split works for every family.
    """

    FIRST_STAGE: tuple[str, ...] = ("embed", "pos_embed")
    LAST_STAGE: tuple[str, ...] = ("final_norm", "lm_head")

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.build_embeddings(config)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(config.num_layers)})
        self.final_norm: nn.Module | None = (make_norm(config) if config.norm_position == "pre"
                                             else None)
        self.build_head(config)
        if config.tied_head:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = False
        self.reset_parameters()

    def build_embeddings(self, config: ModelConfig) -> None:
        self.embed: nn.Embedding | None = _embedding(config.padded_vocab_size, config.hidden_size)
        self.pos_embed: nn.Embedding | None = (
            _embedding(config.seq_len, config.hidden_size)
            if config.position_embedding == "learned"
            else None
        )

    def build_head(self, config: ModelConfig) -> None:
        self.lm_head: nn.Linear | None = nn.Linear(config.hidden_size, config.head_size,
                                                   bias=False)

    def blocks(self) -> list[nn.Module]:
        """Every transformer layer this module holds (a pipeline stage: its own)."""
        return list(self.layers.values())

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2/Megatron init (see `megaloom.model.init`), each parameter drawn from `seed`
        and its name, so any layout can draw the same values slice by slice. Without a seed,
        one is drawn from torch's global generator (`torch.manual_seed` makes it repeatable)."""
        real = [(n, p) for n, p in self.named_parameters() if p.device.type != "meta"]
        if real and seed is None:
            seed = int(torch.randint(0, 2**62, (), device="cpu").item())
        for name, param in real:
            param.copy_(initial_values(name, param.shape, self.config, seed))

    # ------------------------------------------------------------------ forward

    @staticmethod
    def stage_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """The forward's arguments beside the token ids, from a task's micro-batch: its
        `positions` (packed samples; default 0..seq-1), `attn_mask` (default: the model's own
        attention, causal for a decoder) and `token_types` (BERT's segments)."""
        positions = batch.get("positions")
        if positions is None:
            tokens = batch["tokens"]
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape)
        extra = {"token_types": batch["token_types"]} if "token_types" in batch else {}
        return {"positions": positions, "attn_mask": batch.get("attn_mask"), **extra}

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache: object | None = None,
        attn_mask: torch.Tensor | None = None,
        keep_last: int = 0,
        token_types: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (batch, seq) -> logits (batch, seq, padded_vocab), or label scores
        (batch, seq, num_labels) for a classifier (the task pools them).

        A pipeline stage without `embed` takes hidden states (batch, seq, hidden) instead of
        ids, and one without `lm_head` returns hidden states. `keep_last=k > 0` keeps only the
        last k positions before the final norm and head (prefill: 1; scoring: the targets).
        `token_types` (batch, seq) are segment ids, for families with token types (BERT).
        """
        batch, seq = tokens.shape[:2]
        if positions is None:
            positions = torch.arange(seq, device=tokens.device).expand(batch, seq)
        x = tokens if self.embed is None else self.embed_inputs(tokens, positions, token_types)
        rope = None
        if self.config.position_embedding == "rope":
            rope = rope_tables(self.config, positions, x.dtype)
        ctx = AttentionContext(kv_cache=kv_cache, attn_mask=attn_mask, rope=rope,
                               causal=self.config.causal)
        for layer in self.layers.values():
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, ctx, use_reentrant=False)
            else:
                x = layer(x, ctx)
        if keep_last:
            x = x[:, -keep_last:]
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.head(x)

    def embed_inputs(self, tokens: torch.Tensor, positions: torch.Tensor,
                     token_types: torch.Tensor | None) -> torch.Tensor:
        """Ids -> the first layer's input (token + learned position embeddings, dropout)."""
        if token_types is not None:
            raise ValueError(f"model.arch={self.config.arch} has no token types")
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        return self.embed_dropout(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's (normed) output -> logits or label scores (hidden states on a
        stage without the head)."""
        return x if self.lm_head is None else self.lm_head(x)

    # ------------------------------------------------------------------ info

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied weight counts once)."""
        seen: set[int] = set()
        total = 0
        skip = set()
        if exclude_embeddings:
            for module in (self.embed, self.pos_embed):
                if module is not None:
                    skip.add(id(module.weight))
        for param in self.parameters():
            if id(param) in seen or id(param) in skip:
                continue
            seen.add(id(param))
            total += param.numel()
        return total


def lm_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    loss_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy over the real vocabulary (padding columns never count).

    `reduction="sum"` returns the summed token losses, for normalising by a global token count.
    """
    flat = logits[..., :vocab_size].float().reshape(-1, vocab_size)
    losses = F.cross_entropy(flat, targets.reshape(-1), reduction="none")
    if loss_mask is not None:
        losses = losses * loss_mask.reshape(-1).to(losses.dtype)
        count = loss_mask.sum()
    else:
        count = torch.tensor(losses.numel(), device=losses.device)
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / count.clamp(min=1)
