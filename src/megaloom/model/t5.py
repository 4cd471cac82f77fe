"""The T5 encoder-decoder (`model.arch=t5`), built from the decoder's layers.

- Both stacks are pre-norm `Block`s with bias-free RMSNorm: `layers` is the encoder (keys
  0..num_layers-1) and `decoder_layers` the decoder (keys 0..decoder_layers-1), whose blocks
  add cross-attention (`cross_norm`, `cross_attn`) between self-attention and the MLP. The
  encoder ends with `encoder_norm`, the decoder with `final_norm`; one token embedding (`embed`)
  feeds both and, tied, is the head too.
- Positions are T5's relative buckets: one learned (buckets x heads) table per stack
  (`encoder_position_bias`, `decoder_position_bias`), added to the attention scores of every
  layer of that stack; scores are not scaled by 1/sqrt(head_dim) (T5's initialisation absorbs
  it). Cross-attention has no position bias.
- MLP: ReLU (v1.0) or gated GELU (`activation: geglu`, v1.1). With `scale_decoder_output` the
  decoder output is multiplied by hidden^-0.5 before the head (v1.0's tied head).

`forward(tokens, decoder_tokens)` is teacher forcing; `encode` and `decode` are its halves for
generation, where `decode` takes a `KVCache` for self-attention and a `CrossCache` holding each
decoder layer's keys and values of the encoder output (computed once per prompt).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megaloom.config import ModelConfig
from megaloom.model.gpt import GPT, AttentionContext, Block, _embedding, make_norm


def relative_buckets(relative: torch.Tensor, bidirectional: bool, buckets: int,
                     max_distance: int) -> torch.Tensor:
    """T5's bucket of each relative position (key position - query position): exact buckets
    for small distances, logarithmic ones up to `max_distance`, the last bucket beyond; the
    bidirectional table gives future positions their own half."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        buckets //= 2
        bucket = bucket + (relative > 0).long() * buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (buckets - exact)).long()).clamp(max=buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """A (buckets x heads) table of learned attention-score biases; under tensor parallelism
    `weight` holds this rank's heads only (`parallel.parallelize` shards its columns)."""

    def __init__(self, config: ModelConfig, bidirectional: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.relative_buckets, config.num_heads))
        self.bidirectional = bidirectional
        self.buckets, self.max_distance = config.relative_buckets, config.relative_max_distance

    def forward(self, query_positions: torch.Tensor, key_len: int) -> torch.Tensor:
        """Biases (1, heads, q, key_len) for query positions (q,)."""
        keys = torch.arange(key_len, device=query_positions.device)
        bucket = relative_buckets(keys[None, :] - query_positions[:, None], self.bidirectional,
                                  self.buckets, self.max_distance)
        return self.weight[bucket].permute(2, 0, 1)[None]


class CrossAttention(nn.Module):
    """Attention from the decoder onto the encoder output (no position bias, no scaling)."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.head_dim = config.head_dim
        inner = config.num_heads * config.head_dim
        self.q = nn.Linear(config.hidden_size, inner, bias=False)
        self.k = nn.Linear(config.hidden_size, inner, bias=False)
        self.v = nn.Linear(config.hidden_size, inner, bias=False)
        self.proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.dropout = config.dropout

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder output's keys and values (batch, heads, src, head_dim)."""
        k, v = self.k(memory), self.v(memory)
        batch, src = k.shape[:2]
        return (k.view(batch, src, -1, self.head_dim).transpose(1, 2),
                v.view(batch, src, -1, self.head_dim).transpose(1, 2))

    def forward(self, x: torch.Tensor, ctx: CrossContext) -> torch.Tensor:
        q = self.q(x)
        batch, seq = q.shape[:2]
        q = q.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        k, v = ctx.keys_values(self)
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=ctx.mask, scale=1.0,
            dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, -1))


class CrossContext:
    """What cross-attention reads: the encoder output (teacher forcing, keys and values made
    per layer) or a `CrossCache` of them (generation), and the source padding mask (boolean,
    True for real tokens)."""

    def __init__(self, memory: torch.Tensor | None, mask: torch.Tensor | None,
                 cache: object | None = None):
        self.memory, self.cache = memory, cache
        self.mask = None if mask is None else mask[:, None, None, :]  # (batch, src): True = real

    def keys_values(self, attn: CrossAttention) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None:
            return self.cache.read(attn.layer_index)
        return attn.keys_values(self.memory)


class DecoderBlock(Block):
    """Self-attention, cross-attention onto the encoder output, MLP (each pre-norm)."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__(config, layer_index)
        self.cross_norm = make_norm(config)
        self.cross_attn = CrossAttention(config, layer_index)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cross: CrossContext
                ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), ctx))
        x = x + self.dropout(self.cross_attn(self.cross_norm(x), cross))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


def _padding_bias(keep: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch, key_len) booleans (True: a real token) -> an additive (batch, 1, 1, key) mask."""
    if keep is None:
        return None
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
        ~keep, torch.finfo(dtype).min)[:, None, None, :]


class T5(GPT):
    """An encoder-decoder; `forward(tokens, decoder_tokens)` returns the decoder's logits over
    the padded vocabulary (teacher forcing: `decoder_tokens` start with `decoder_start_id`)."""

    FIRST_STAGE = ("embed",)
    LAST_STAGE = ("final_norm", "lm_head")
    SEQUENCE_REPLICATED = ("encoder_norm",)
    HEAD_SHARDED = ("encoder_position_bias", "decoder_position_bias")  # columns = heads
    encoder_decoder = True

    def __init__(self, config: ModelConfig):
        nn.Module.__init__(self)
        config.validate()
        self.config = config
        self.embed = _embedding(config.padded_vocab_size, config.hidden_size)
        self.pos_embed = None
        self.embed_dropout = nn.Dropout(config.dropout)
        self.encoder_position_bias = RelativePositionBias(config, bidirectional=True)
        self.layers = nn.ModuleDict({str(i): Block(config, i) for i in range(config.num_layers)})
        self.encoder_norm = make_norm(config)
        self.decoder_position_bias = RelativePositionBias(config, bidirectional=False)
        self.decoder_layers = nn.ModuleDict({str(i): DecoderBlock(config, i)
                                             for i in range(config.decoder_layers)})
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        if config.tied_head:
            self.lm_head.weight = self.embed.weight
        self.activation_checkpointing = False
        self.reset_parameters()

    def blocks(self):
        """Every transformer layer, encoder then decoder."""
        return [*self.layers.values(), *self.decoder_layers.values()]

    # ------------------------------------------------------------------ forward

    @staticmethod
    def stage_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """The forward's arguments beside the source ids, from a task's micro-batch."""
        return {"decoder_tokens": batch["decoder_tokens"], "attn_mask": batch.get("attn_mask")}

    def forward(self, tokens: torch.Tensor, decoder_tokens: torch.Tensor,
                attn_mask: torch.Tensor | None = None, keep_last: int = 0) -> torch.Tensor:
        """Source ids (batch, src) and decoder input ids (batch, tgt) -> logits (batch, tgt,
        padded_vocab); `attn_mask` (batch, src) marks the real source tokens (None: all)."""
        return self.decode(decoder_tokens, self.encode(tokens, attn_mask), attn_mask,
                           keep_last=keep_last)

    def encode(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Source ids (batch, src) -> the normed encoder output (batch, src, hidden)."""
        x = self.embed_dropout(self.embed(tokens))
        length = tokens.shape[1]
        bias = self.encoder_position_bias(torch.arange(length, device=tokens.device), length)
        bias = bias.to(x.dtype)
        padding = _padding_bias(attn_mask, x.dtype)
        ctx = AttentionContext(attn_mask=bias if padding is None else bias + padding,
                               causal=False)
        for layer in self.layers.values():
            x = self._run(layer, x, ctx)
        return self.embed_dropout(self.encoder_norm(x))

    def decode(self, decoder_tokens: torch.Tensor, memory: torch.Tensor,
               memory_mask: torch.Tensor | None, keep_last: int = 0) -> torch.Tensor:
        """Teacher forcing: decoder ids (batch, tgt) attending causally to each other and to
        the encoder output `memory` -> logits."""
        length = decoder_tokens.shape[1]
        positions = torch.arange(length, device=decoder_tokens.device)
        bias = self.decoder_position_bias(positions, length)
        future = positions[None, :] > positions[:, None]
        bias = bias.masked_fill(future, float("-inf"))
        cross = CrossContext(memory, memory_mask)
        return self._decoder(decoder_tokens, bias, None, cross, keep_last)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor,
                    kv_cache: object, cross_cache: object) -> torch.Tensor:
        """Generation: one new token per row (batch, 1) at `positions` (batch,), reading the
        cached positions `visible` (batch, kv_len) marks, the encoder's keys and values from
        `cross_cache` -> logits (batch, 1, vocab), or scaled hidden states without `lm_head`."""
        bias = self.decoder_position_bias(positions, visible.shape[1]).transpose(0, 2)
        cross = CrossContext(None, cross_cache.mask, cross_cache)
        return self._decoder(tokens, bias.masked_fill(~visible[:, None, None, :],
                                                      float("-inf")), kv_cache, cross)

    def _decoder(self, tokens: torch.Tensor, bias: torch.Tensor, kv_cache: object | None,
                 cross: CrossContext, keep_last: int = 0) -> torch.Tensor:
        x = self.embed_dropout(self.embed(tokens))
        ctx = AttentionContext(kv_cache=kv_cache, attn_mask=bias.to(x.dtype), causal=False)
        for layer in self.decoder_layers.values():
            x = self._run(layer, x, ctx, cross)
        if keep_last:
            x = x[:, -keep_last:]
        x = self.embed_dropout(self.final_norm(x))
        if self.config.scale_decoder_output:
            x = x * self.config.hidden_size ** -0.5
        return x if self.lm_head is None else self.lm_head(x)

    def _run(self, layer: nn.Module, x: torch.Tensor, *contexts) -> torch.Tensor:
        if self.activation_checkpointing and self.training:
            return checkpoint(layer, x, *contexts, use_reentrant=False)
        return layer(x, *contexts)
