"""How the engine runs a model family's forward passes: the one place that knows whether a
prompt starts the decoded sequence (decoder-only GPT) or is a separate source (T5).

The engine keeps slots, sampling and bookkeeping; a runner owns the caches and answers
`prefill(tokens, start)` (whole prompts of one length into slots `start..`) and
`decode(tokens, positions, visible)` (one token per running slot), both returning the output
at the last position (logits, or final hidden states when the engine applies the head), and
`move(src, dst, length)` when a slot is compacted. `offset(prompt_len)` is where a sequence's
first generated token sits in the decoder: after the prompt, or after the start token.
"""

from __future__ import annotations

import torch
from torch import nn

from megaloom.infer.kv_cache import KVCache


class DecoderRunner:
    """Decoder-only models: the prompt is prefilled into the self-attention cache."""

    def __init__(self, model: nn.Module, slots: int, kv_heads: int, dtype: torch.dtype,
                 device: torch.device):
        config = model.config
        self.model = model
        self.max_len = self.max_prompt = config.seq_len
        self.cache = KVCache(config.num_layers, slots, kv_heads, self.max_len, config.head_dim,
                             dtype, device)

    def offset(self, prompt_len: int) -> int:
        return prompt_len

    def prefill(self, tokens: torch.Tensor, start: int, keep_last: int = 1) -> torch.Tensor:
        return self.model(tokens, kv_cache=self.cache.prefill(start, len(tokens)),
                          keep_last=keep_last)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor
               ) -> torch.Tensor:
        cache = self.cache.decode(len(tokens), positions, visible.shape[1])
        return self.model(tokens[:, None], positions[:, None], kv_cache=cache,
                          attn_mask=visible[:, None, None, :])

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)


class CrossCache:
    """Each decoder layer's keys and values of each slot's encoder output (computed once per
    prompt) and the slot's source mask; `select` says which rows the next forward reads."""

    def __init__(self, layers: int, slots: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, slots, heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.keep = torch.zeros(slots, max_len, dtype=torch.bool, device=device)
        self.lengths = [0] * slots
        self._rows, self._len = slice(0, 0), 0

    def store(self, model: nn.Module, memory: torch.Tensor, start: int) -> None:
        """Keys and values of `memory` (count, src, hidden) for slots `start..start+count-1`."""
        rows, length = slice(start, start + len(memory)), memory.shape[1]
        for index, layer in enumerate(model.decoder_layers.values()):
            k, v = layer.cross_attn.keys_values(memory)
            self.k[index, rows, :, :length], self.v[index, rows, :, :length] = k, v
        self.keep[rows] = False
        self.keep[rows, :length] = True
        self.lengths[rows] = [length] * len(memory)

    def select(self, rows: slice) -> CrossCache:
        self._rows, self._len = rows, max(self.lengths[rows])
        return self

    @property
    def mask(self) -> torch.Tensor:
        return self.keep[self._rows, : self._len]

    def read(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.k[layer_index, self._rows, :, : self._len],
                self.v[layer_index, self._rows, :, : self._len])

    def move(self, src: int, dst: int) -> None:
        length = self.lengths[src]
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        self.keep[dst] = self.keep[src]
        self.lengths[dst] = length


class EncoderDecoderRunner:
    """Encoder-decoder models (T5): a prompt is encoded once into the cross cache, and the
    decoder starts from `decoder_start_id` at position 0."""

    def __init__(self, model: nn.Module, slots: int, heads: int, dtype: torch.dtype,
                 device: torch.device):
        config = model.config
        self.model = model
        self.max_prompt, self.max_len = config.seq_len, config.decoder_seq_len
        self.start_id = config.decoder_start_id
        self.cache = KVCache(config.decoder_layers, slots, heads, self.max_len, config.head_dim,
                             dtype, device)
        self.cross = CrossCache(config.decoder_layers, slots, heads, self.max_prompt,
                                config.head_dim, dtype, device)

    def offset(self, prompt_len: int) -> int:
        return 1  # the start token

    def prefill(self, tokens: torch.Tensor, start: int, keep_last: int = 1) -> torch.Tensor:
        count = len(tokens)
        self.cross.store(self.model, self.model.encode(tokens), start)
        first = torch.full((count, 1), self.start_id, dtype=torch.long, device=tokens.device)
        visible = torch.ones(count, 1, dtype=torch.bool, device=tokens.device)
        positions = torch.zeros(count, dtype=torch.long, device=tokens.device)
        return self.model.decode_step(first, positions, visible,
                                      self.cache.prefill(start, count),
                                      self.cross.select(slice(start, start + count)))

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor
               ) -> torch.Tensor:
        batch = len(tokens)
        cache = self.cache.decode(batch, positions, visible.shape[1])
        return self.model.decode_step(tokens[:, None], positions, visible, cache,
                                      self.cross.select(slice(0, batch)))

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)
        self.cross.move(src, dst)


def make_runner(model: nn.Module, slots: int, dtype: torch.dtype, device: torch.device):
    """The runner of `model`'s family; tensor-parallel shards cache only their own heads."""
    config = model.config
    if getattr(model, "encoder_decoder", False):
        heads = getattr(model, "local_heads", config.num_heads)
        return EncoderDecoderRunner(model, slots, heads, dtype, device)
    kv_heads = getattr(model, "local_kv_heads", config.num_kv_heads)
    return DecoderRunner(model, slots, kv_heads, dtype, device)
