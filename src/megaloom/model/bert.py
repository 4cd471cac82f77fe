"""The BERT encoder (`model.arch=bert`): the decoder's layers, attending both ways, with
BERT's embeddings and heads.

- Embeddings: token + learned position + token-type (segment) embeddings; with post-norm
  layers (`norm_position: post`, Hugging Face `BertForMaskedLM`) a LayerNorm follows them
  (`embed_norm`), with pre-norm layers (Megatron's BERT, HF `MegatronBertForMaskedLM`) a final
  norm closes the encoder instead (`final_norm`).
- Masked-LM head (`num_labels=0`): dense + GELU + LayerNorm, then `lm_head` onto the padded
  vocabulary with a bias, its weight tied to the token embedding. With `binary_head`, the
  pooler (dense + tanh on the first token) feeds a 2-way sentence-order head too, and the
  forward returns (logits, order scores).
- Classifier (`num_labels>0`): pooler, dropout, `lm_head` onto the labels; the forward returns
  (batch, num_labels) scores.

Parameter names follow the decoder's (`embed`, `layers.i.attn.qkv`, `lm_head`), so the
parallel plan, checkpoints and initialisation rules are the decoder's; `megaloom.parallel`
adds the sequence-parallel marks for the extra replicated modules (`SEQUENCE_REPLICATED`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaloom.config import ModelConfig
from megaloom.model.gpt import GPT, _embedding, make_norm

ORDER_CLASSES = 2  # sentence-order prediction: in order / swapped


class BERT(GPT):
    """A bidirectional encoder; `forward(tokens, token_types=...)` returns masked-LM logits
    over the padded vocabulary (and sentence-order scores), or a classifier's label scores."""

    FIRST_STAGE = (*GPT.FIRST_STAGE, "token_type_embed", "embed_norm")
    LAST_STAGE = (*GPT.LAST_STAGE, "head_dense", "head_norm", "pooler", "binary_head")
    SEQUENCE_REPLICATED = ("embed_norm", "head_dense", "head_norm")  # act on sequence shards

    def build_embeddings(self, config: ModelConfig) -> None:
        super().build_embeddings(config)
        self.token_type_embed: nn.Embedding | None = (
            _embedding(config.type_vocab_size, config.hidden_size)
            if config.type_vocab_size else None)
        self.embed_norm: nn.Module | None = (make_norm(config)
                                             if config.norm_position == "post" else None)

    def build_head(self, config: ModelConfig) -> None:
        hidden = config.hidden_size
        pooled = bool(config.num_labels) or config.binary_head
        self.pooler: nn.Linear | None = nn.Linear(hidden, hidden) if pooled else None
        self.head_dropout = nn.Dropout(config.dropout)
        self.binary_head: nn.Linear | None = (nn.Linear(hidden, ORDER_CLASSES)
                                              if config.binary_head else None)
        masked_lm = not config.num_labels
        self.head_dense: nn.Linear | None = nn.Linear(hidden, hidden) if masked_lm else None
        self.head_norm: nn.Module | None = make_norm(config) if masked_lm else None
        self.lm_head: nn.Linear | None = nn.Linear(hidden, config.head_size, bias=True)

    def embed_inputs(self, tokens: torch.Tensor, positions: torch.Tensor,
                     token_types: torch.Tensor | None) -> torch.Tensor:
        x = self.embed(tokens) + self.pos_embed(positions)
        if self.token_type_embed is not None:
            if token_types is None:
                token_types = torch.zeros_like(tokens)
            x = x + self.token_type_embed(token_types)
        elif token_types is not None:
            raise ValueError("token types given but model.type_vocab_size is 0")
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.embed_dropout(x)

    def head(self, x: torch.Tensor):
        if self.lm_head is None:
            return x
        pooled = None
        if self.pooler is not None:
            pooled = self.head_dropout(torch.tanh(self.pooler(x[:, 0])))
        if self.config.num_labels:
            return self.lm_head(pooled)
        approximate = "tanh" if self.config.activation == "gelu_tanh" else "none"
        hidden = self.head_norm(F.gelu(self.head_dense(x), approximate=approximate))
        logits = self.lm_head(hidden)
        if self.binary_head is None:
            return logits
        return logits, self.binary_head(pooled)
