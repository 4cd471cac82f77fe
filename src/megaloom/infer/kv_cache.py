"""Preallocated keys and values for a fixed number of sequence slots, every layer at once.

Owns `KVCache`, the object `GPT.forward(kv_cache=...)` talks to through
`update(layer_index, k, v)`. The engine keeps its running sequences in slots `0..batch-1`
(retiring one moves the last slot into the hole), so a decode step reads plain views of the
buffers, with no per-step allocation or gather. Before each forward the engine says what the
call is: `prefill(start, count)` writes whole prompts into consecutive slots from position 0;
`decode(batch, positions, kv_len)` writes one token per slot at its own position.
"""

from __future__ import annotations

import torch


class KVCache:
    """Key/value buffers of shape (layers, slots, kv_heads, max_len, head_dim)."""

    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = slots
        self.max_len = max_len
        self._prefill_rows: slice | None = None
        self._batch = 0
        self.rows = torch.arange(slots, device=device)
        self._flat_rows: torch.Tensor | None = None
        self._kv_len = 0

    def prefill(self, start: int, count: int) -> KVCache:
        """The next forward holds `count` whole prompts for slots `start..start+count-1`."""
        self._prefill_rows = slice(start, start + count)
        return self

    def decode(self, batch: int, positions: torch.Tensor, kv_len: int) -> KVCache:
        """The next forward holds one token for each slot `0..batch-1`, at `positions`
        (batch,); attention reads the first `kv_len` positions of each slot."""
        self._prefill_rows = None
        self._batch, self._kv_len = batch, kv_len
        # Row of each (slot, head) pair's new entry in a layer viewed as (-1, head_dim):
        # one index_copy_ per tensor and layer, cheaper than 2-D advanced indexing.
        heads = self.k.shape[2]
        slot_heads = torch.arange(batch * heads, device=self.k.device).view(batch, heads)
        self._flat_rows = (slot_heads * self.max_len + positions[:, None]).reshape(-1)
        return self

    def update(self, layer_index: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values (batch, kv_heads, new, head_dim); return what attention reads."""
        layer_k, layer_v = self.k[layer_index], self.v[layer_index]
        if self._prefill_rows is not None:
            length = k.shape[2]
            layer_k[self._prefill_rows, :, :length] = k
            layer_v[self._prefill_rows, :, :length] = v
            return k, v
        head_dim = k.shape[-1]
        layer_k.view(-1, head_dim).index_copy_(0, self._flat_rows, k.reshape(-1, head_dim))
        layer_v.view(-1, head_dim).index_copy_(0, self._flat_rows, v.reshape(-1, head_dim))
        return layer_k[: self._batch, :, : self._kv_len], layer_v[: self._batch, :, : self._kv_len]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst`, all layers."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
