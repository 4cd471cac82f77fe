"""Hugging Face BERT models <-> megaloom's BERT family: `config.json` fields and tensor names.

Post-norm models are HF `bert` (`BertForMaskedLM`, `BertForPreTraining` with the sentence
head, `BertForSequenceClassification`); pre-norm ones are HF `megatron-bert` (`MegatronBert*`:
a LayerNorm before each sublayer, `bert.encoder.ln` at the end, none after the embeddings).
Values that change the computation and megaloom does not implement (relative position
embeddings, a decoder, cross-attention, other activations) are refused by name, as for the
decoders. q, k and v are fused into megaloom's grouped `qkv` by `weights.fuse_qkv`.
"""

from __future__ import annotations

from typing import Any

from megaloom.config import ModelConfig

MODEL_TYPES = {"bert": "post", "megatron-bert": "pre"}
PREFIX = "bert."
TOP_LEVEL = ("cls.", "classifier.")  # HF names outside the `bert.` base model
BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
# The vocabulary bias: HF's decoder uses `decoder.bias`, which is `cls.predictions.bias` when
# the embeddings are tied; untied, the two are separate and only `decoder.bias` counts.
TIED_BIAS, DECODER_BIAS = "cls.predictions.bias", "cls.predictions.decoder.bias"
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
EXPORT_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
REQUIRED_VALUES = {"position_embedding_type": "absolute", "is_decoder": False,
                   "add_cross_attention": False, "is_encoder_decoder": False}
TIED_HEAD = "cls.predictions.decoder.weight"  # equal to the word embedding when tied
Pair = tuple[str, str, bool]


def class_names(model_type: str) -> dict[str, str]:
    """HF architecture name of each head: masked LM, pretraining (sentence head), classifier."""
    stem = "MegatronBert" if model_type == "megatron-bert" else "Bert"
    return {"mlm": f"{stem}ForMaskedLM", "pretraining": f"{stem}ForPreTraining",
            "classify": f"{stem}ForSequenceClassification", "base": f"{stem}Model"}


def model_config_from_hf(hf: dict[str, Any], source: str, num_labels: int) -> ModelConfig:
    """The megaloom config of a HF BERT `config.json` (unsupported values raise ValueError
    naming the field; the caller words the error)."""
    model_type = hf["model_type"]
    for key, expected in REQUIRED_VALUES.items():
        if hf.get(key, expected) != expected:
            raise ValueError(f"unsupported {key}={hf[key]!r} (megaloom implements "
                             f"{key}={expected!r})")
    activation = hf.get("hidden_act", "gelu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act={activation!r} (supported: "
                         f"{', '.join(ACTIVATIONS)})")
    architectures = hf.get("architectures") or []
    names = class_names(model_type)
    dropout = max(hf.get("hidden_dropout_prob", 0.1), hf.get("attention_probs_dropout_prob", 0.1))
    return ModelConfig(
        arch="bert",
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_heads=hf["num_attention_heads"],
        ffn_hidden_size=hf["intermediate_size"],
        seq_len=hf.get("max_position_embeddings", 512),
        vocab_size=hf["vocab_size"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        dropout=dropout,
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        init_std=hf.get("initializer_range", 0.02),
        activation=ACTIVATIONS[activation],
        tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_position=MODEL_TYPES[model_type],
        binary_head=names["pretraining"] in architectures,
        num_labels=num_labels if names["classify"] in architectures else 0,
    )


def hf_config_from_model(config: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
    """The HF `config.json` dict of a megaloom BERT model (`common`: the shared fields)."""
    if config.activation not in EXPORT_ACTIVATIONS:
        raise ValueError(f"model.activation={config.activation!r} cannot be written as a "
                         "Hugging Face BERT model")
    if config.num_heads * config.head_dim != config.hidden_size or (
            config.num_kv_heads != config.num_heads):
        raise ValueError("Hugging Face BERT needs model.num_heads x model.head_dim == "
                         "model.hidden_size and no grouped-query attention (num_kv_heads)")
    model_type = "bert" if config.norm_position == "post" else "megatron-bert"
    names = class_names(model_type)
    head = "classify" if config.num_labels else "pretraining" if config.binary_head else "mlm"
    return dict(
        architectures=[names[head]],
        model_type=model_type,
        num_hidden_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        intermediate_size=config.ffn_hidden_size,
        max_position_embeddings=config.seq_len,
        type_vocab_size=config.type_vocab_size,
        hidden_act=EXPORT_ACTIVATIONS[config.activation],
        layer_norm_eps=config.norm_eps,
        hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout,
        pad_token_id=0,
        **REQUIRED_VALUES,
        **{k: v for k, v in common.items() if k not in ("bos_token_id", "eos_token_id")
           or v is not None},
    )


def _linear(ours: str, theirs: str, bias: bool = True) -> list[Pair]:
    kinds = ("weight", "bias") if bias else ("weight",)
    return [(f"{ours}.{kind}", f"{theirs}.{kind}", False) for kind in kinds]


def layer_pairs(config: ModelConfig, i: int) -> list[Pair]:
    ours, hf = f"layers.{i}", f"bert.encoder.layer.{i}"
    post = config.norm_position == "post"
    attn_norm = f"{hf}.attention.output.LayerNorm" if post else f"{hf}.attention.ln"
    mlp_norm = f"{hf}.output.LayerNorm" if post else f"{hf}.ln"
    return [*_linear(f"{ours}.attn_norm", attn_norm),
            *_linear(f"{ours}.attn.proj", f"{hf}.attention.output.dense"),
            *_linear(f"{ours}.mlp_norm", mlp_norm),
            *_linear(f"{ours}.mlp.up", f"{hf}.intermediate.dense"),
            *_linear(f"{ours}.mlp.down", f"{hf}.output.dense")]


def top_pairs(config: ModelConfig) -> list[Pair]:
    pairs = [("embed.weight", "bert.embeddings.word_embeddings.weight", False),
             ("pos_embed.weight", "bert.embeddings.position_embeddings.weight", False),
             ("token_type_embed.weight", "bert.embeddings.token_type_embeddings.weight", False)]
    if config.norm_position == "post":
        pairs += _linear("embed_norm", "bert.embeddings.LayerNorm")
    else:
        pairs += _linear("final_norm", "bert.encoder.ln")
    if config.num_labels or config.binary_head:
        pairs += _linear("pooler", "bert.pooler.dense")
    if config.num_labels:
        return pairs + _linear("lm_head", "classifier")
    pairs += [*_linear("head_dense", "cls.predictions.transform.dense"),
              *_linear("head_norm", "cls.predictions.transform.LayerNorm"),
              ("lm_head.bias", TIED_BIAS if config.tie_embeddings else DECODER_BIAS, False)]
    if not config.tie_embeddings:
        pairs.append(("lm_head.weight", TIED_HEAD, False))
    if config.binary_head:
        pairs += _linear("binary_head", "cls.seq_relationship")
    return pairs


def ignored(config: ModelConfig) -> tuple[str, ...]:
    """HF names that hold no state megaloom uses (buffers, the bias HF's forward skips)."""
    unused_bias = DECODER_BIAS if config.tie_embeddings else TIED_BIAS
    return (*BUFFERS, unused_bias) if not config.num_labels else BUFFERS


def export_aliases(config: ModelConfig) -> list[tuple[str, str]]:
    """(HF name, HF name it copies) written on export beside the pairs: an untied model's
    `cls.predictions.bias`, so `transformers` finds every tensor it declares."""
    if config.num_labels or config.tie_embeddings:
        return []
    return [(TIED_BIAS, DECODER_BIAS)]


def all_pairs(config: ModelConfig) -> list[Pair]:
    return top_pairs(config) + [p for i in range(config.num_layers)
                                for p in layer_pairs(config, i)]


def qkv_hf_names(config: ModelConfig, i: int, kind: str, stack: str = "layers") -> list[str]:
    """HF names of encoder layer `i`'s q, k and v (BERT has one stack)."""
    return [f"bert.encoder.layer.{i}.attention.self.{p}.{kind}"
            for p in ("query", "key", "value")]
