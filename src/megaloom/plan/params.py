"""Exact parameter counts of a `ModelConfig`, whole, per pipeline stage and per GPU.

Closed forms that mirror `megaloom.model.gpt.GPT` term by term (the tests hold them equal to
`num_parameters()` of the model built on the `meta` device):

- per layer: two norms (weight, plus bias for a LayerNorm with `bias`), the fused `qkv`
  projection (h x (a + 2 a_kv) d), the output projection (h x h), the MLP (`up`, `down`, plus
  `gate` for SwiGLU), each Linear with a bias when `bias` is set;
- the token embedding over the padded vocabulary V, learned position embeddings (s x h) only
  for `position_embedding: learned`, a final norm, and an `lm_head` (V x h) unless tied.

For the GPT-2 flavour this is 12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h)) plus the final norm's 2h
(`gpt2_closed_form` is the paper's expression, without the final norm).

Pipeline stages: layers split as the runtime splits them; the first stage holds the
embeddings, the last the final norm and the head. With tied embeddings and pp > 1 the last
stage stores its own copy of the word embedding for the head, as Megatron does, so the
stages sum to the model count plus that copy. Tensor parallelism splits the Linear weights
(and the column-parallel biases) and the vocabulary; norms, position embeddings and the row-
parallel biases (`proj`, `down`) are replicated on every tensor-parallel rank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from megaloom.config import GATED_ACTIVATIONS, ModelConfig
from megaloom.layout_rules import rank_layers
from megaloom.model.registry import family_of


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one transformer layer: split over tp (`sharded`) or held by every rank."""

    sharded: int
    replicated: int

    @property
    def total(self) -> int:
        return self.sharded + self.replicated


@dataclass(frozen=True)
class StageParams:
    """Distinct parameters stored by one pipeline stage (summed over its tp ranks)."""

    stage: int
    num_layers: int
    embedding: int
    layers: int
    head: int

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.head

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def norm_parameters(model: ModelConfig) -> int:
    """One norm: RMSNorm has a weight; LayerNorm a weight and, with `bias`, a bias."""
    with_bias = model.norm == "layernorm" and model.bias
    return model.hidden_size * (2 if with_bias else 1)


def layer_parameters(model: ModelConfig) -> LayerParams:
    h, d, f = model.hidden_size, model.head_dim, model.ffn_hidden_size
    qkv_width = (model.num_heads + 2 * model.num_kv_heads) * d
    mlp_inputs = 2 if model.activation in GATED_ACTIVATIONS else 1  # up (+ gate)
    bias = 1 if model.bias else 0
    sharded = (
        h * qkv_width + bias * qkv_width  # qkv: column parallel
        + model.num_heads * d * h  # proj weight: row parallel
        + mlp_inputs * (h * f + bias * f)  # up/gate: column parallel
        + f * h  # down weight: row parallel
    )
    replicated = 2 * norm_parameters(model) + bias * 2 * h  # proj and down biases
    return LayerParams(sharded=sharded, replicated=replicated)


def word_embedding_parameters(model: ModelConfig) -> int:
    return model.padded_vocab_size * model.hidden_size


def position_embedding_parameters(model: ModelConfig) -> int:
    return model.seq_len * model.hidden_size if model.position_embedding == "learned" else 0


def final_norm_parameters(model: ModelConfig) -> int:
    """The norm after the last layer (pre-norm layers only; post-norm layers end normed)."""
    return norm_parameters(model) if model.norm_position == "pre" else 0


def count_parameters(model: ModelConfig) -> int:
    """Distinct parameters of the whole model (a tied head counts once), with what the
    family adds (`model.registry`: BERT's token types and heads)."""
    head = 0 if model.tied_head else model.head_size * model.hidden_size
    extra = family_of(model).extra_parameters(model)
    return (
        word_embedding_parameters(model)
        + position_embedding_parameters(model)
        + model.num_layers * layer_parameters(model).total
        + final_norm_parameters(model)
        + head
        + extra.embedding + extra.head_replicated + extra.head_sharded
    )


def gpt2_closed_form(num_layers: int, hidden: int, vocab: int, seq_len: int) -> int:
    """12 l h^2 (1 + 13/(12h) + (V+s)/(12 l h)) = 12 l h^2 + 13 l h + (V+s) h (no final norm)."""
    return 12 * num_layers * hidden**2 + 13 * num_layers * hidden + (vocab + seq_len) * hidden


def stage_parameters(model: ModelConfig, pp: int, vpp: int = 1) -> list[StageParams]:
    """Per pipeline rank, with the runtime's split of layers (`layout_rules.rank_layers`:
    balanced blocks, earlier ones taking the remainder; `vpp` interleaved chunks each)."""
    layer = layer_parameters(model).total
    stages = []
    for stage in range(pp):
        per_stage = sum(len(block) for block in rank_layers(model.num_layers, pp, vpp, stage))
        first, last = stage == 0, stage == pp - 1
        extra = family_of(model).extra_parameters(model)
        embedding = (word_embedding_parameters(model) + position_embedding_parameters(model)
                     + extra.embedding if first else 0)
        head = (final_norm_parameters(model) + head_weight_parameters(model, first)
                + extra.head_replicated + extra.head_sharded if last else 0)
        stages.append(StageParams(stage, per_stage, embedding, per_stage * layer, head))
    return stages


def head_weight_parameters(model: ModelConfig, on_first_stage: bool) -> int:
    """The head's weight on the last stage: the labels of a classifier, else the vocabulary;
    none when it is the tied embedding stored on the same stage."""
    if model.num_labels:
        return model.head_size * model.hidden_size
    return 0 if model.tie_embeddings and on_first_stage else word_embedding_parameters(model)


def parameters_per_gpu(model: ModelConfig, stage: StageParams, tp: int) -> int:
    """Parameters one tensor-parallel rank of `stage` stores (vocabulary or labels split over
    tp, padded to a multiple of tp)."""
    layer = layer_parameters(model)
    extra = family_of(model).extra_parameters(model)
    vocab_shard = math.ceil(model.padded_vocab_size / tp) * model.hidden_size
    total = stage.num_layers * (layer.sharded // tp + layer.replicated)
    if stage.embedding:
        total += vocab_shard + position_embedding_parameters(model) + extra.embedding
    if stage.head:
        weight = head_weight_parameters(model, stage.embedding > 0)
        if weight:
            total += math.ceil(model.head_size / tp) * model.hidden_size
        total += (final_norm_parameters(model) + extra.head_replicated
                  + math.ceil(extra.head_sharded / tp))
    return total
