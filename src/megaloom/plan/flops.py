"""FLOPs per token and the pipeline bubble: the conventions behind every MFU megaloom reports.

Model FLOPs per token (forward + backward, no recomputation) = 6 N + 12 L h s, as in the
Megatron and PaLM papers:

- N counts the parameters that take part in matrix products: every parameter except the
  input lookups (the token embedding when the head is untied, learned position embeddings).
  A tied embedding is counted once, as the head. Norms and biases are counted too (a few
  FLOPs each, the convention's rounding).
- 12 L h s is attention over the context: QK^T and scores x V are 2 * 2 s h FLOPs per token
  and layer forward, times 3 with the backward pass; the full s x s square is counted even
  though causal attention needs half of it. It depends on the query width h only, so GQA
  does not change it. T5 counts its encoder and decoder layers (L = both; cross-attention is
  counted like self-attention over s).

Hardware FLOPs add recomputation: full recompute runs every layer's forward again
(2 N_layers + 4 L h s more per token; the head is not recomputed). For GPT-2 this is Narayanan
et al.'s 96 B s l h^2 (1 + s/(6h) + V/(16 l h)) per iteration. Selective recompute repeats
the attention scores only, and Korthikanti et al. 2022 count it two ways (`HFU_CONVENTIONS`):
their prose recomputes the two attention matmuls' forward once, 4 L h s more per token
("prose"); their printed Eq. 8, 72 B s l h^2 (1 + s/(3h) + V/(12 h l)), doubles the model's
attention term instead, 12 L h s more per token ("eq8", the default, the one their Table 5
HFU is computed with).

Bubble fraction of the 1F1B pipeline schedule: idle time over compute time, (p - 1)/m,
divided by v when interleaved.
"""

from __future__ import annotations

from megaloom.config import ModelConfig
from megaloom.plan.params import (
    count_parameters,
    layer_parameters,
    position_embedding_parameters,
    word_embedding_parameters,
)


def flops_parameters(model: ModelConfig) -> int:
    """N of the 6N rule: the parameters used in matrix products (not the input lookups)."""
    lookups = position_embedding_parameters(model)
    if not model.tie_embeddings:
        lookups += word_embedding_parameters(model)
    return count_parameters(model) - lookups


def attention_flops_per_token(model: ModelConfig) -> float:
    """12 L h s: forward and backward of QK^T and scores x V."""
    return 12.0 * model.num_blocks * model.hidden_size * model.seq_len


def model_flops_per_token(model_config: ModelConfig) -> float:
    """6 N + 12 L h s: the FLOPs one trained token costs, excluding recomputation (for MFU)."""
    return 6.0 * flops_parameters(model_config) + attention_flops_per_token(model_config)


HFU_CONVENTIONS: tuple[str, ...] = ("eq8", "prose")


def hardware_flops_per_token(model: ModelConfig, recompute: str,
                             hfu_convention: str = "eq8") -> float:
    """Model FLOPs plus the work that `recompute` (none/selective/full) repeats; selective
    recompute counted by `hfu_convention` ("eq8" or "prose", see the module docstring)."""
    attention = attention_flops_per_token(model)
    selective = {"eq8": attention, "prose": attention / 3}[hfu_convention]
    extra = {
        "none": 0.0,
        "selective": selective,
        "full": 2.0 * model.num_blocks * layer_parameters(model).total + attention / 3,
    }[recompute]
    return model_flops_per_token(model) + extra


def bubble_fraction(pp: int, num_micro_batches: int, vpp: int = 1) -> float:
    """Pipeline idle time over compute time: (p - 1) / (m v)."""
    return (pp - 1) / (num_micro_batches * vpp)
