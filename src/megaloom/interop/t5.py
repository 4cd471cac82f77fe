"""Hugging Face T5 (`T5ForConditionalGeneration`) <-> megaloom's T5 family: `config.json`
fields and tensor names.

v1.0 checkpoints (`feed_forward_proj: relu`, a tied head, decoder output scaled by
d_model^-0.5) and v1.1 ones (`gated-gelu`, an untied `lm_head`, no scaling) both map, as do
`gelu` and `gated-silu` (SwiGLU) MLPs. Whether
the decoder output is scaled is `scale_decoder_outputs` where the file says it (transformers
5 writes it), else the older convention `tie_word_embeddings`. Each stack's relative-position
table lives in its block 0 (`...block.0.layer.0.SelfAttention.relative_attention_bias`).
Self-attention q, k, v are fused into megaloom's `qkv` by `weights.fuse_qkv`; cross-attention
keeps separate q, k and v. Anything megaloom does not compute the same way (other activations,
a decoder-only T5) is refused by name.
"""

from __future__ import annotations

from typing import Any

from megaloom.config import ModelConfig

MODEL_TYPES = ("t5",)
ARCHITECTURES = ("T5ForConditionalGeneration",)
PREFIX = ""
TOP_LEVEL: tuple[str, ...] = ()
TIED_HEAD = "lm_head.weight"
# Copies of the shared embedding that some checkpoints store under each stack's name.
ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gated-gelu": "geglu", "gated-gelu_new": "geglu",
               "gated-silu": "swiglu"}
EXPORT_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "geglu": "gated-gelu",
                      "swiglu": "gated-silu"}
Pair = tuple[str, str, bool]


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The megaloom config of a HF T5 `config.json` (unsupported values raise ValueError
    naming the field)."""
    for name in hf.get("architectures") or []:
        if name not in ARCHITECTURES:
            raise ValueError(f"architectures={name!r} is not supported for t5 (supported: "
                             f"{', '.join(ARCHITECTURES)})")
    activation = hf.get("feed_forward_proj", "relu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unsupported feed_forward_proj={activation!r} (supported: "
                         f"{', '.join(ACTIVATIONS)})")
    if hf.get("is_encoder_decoder", True) is not True or hf.get("is_decoder", False):
        raise ValueError("unsupported is_encoder_decoder/is_decoder (megaloom's T5 is the "
                         "whole encoder-decoder)")
    tied = hf.get("tie_word_embeddings", True)
    scaled = hf.get("scale_decoder_outputs", tied is not False)
    return ModelConfig(
        arch="t5",
        num_layers=hf["num_layers"],
        decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"],
        hidden_size=hf["d_model"],
        num_heads=hf["num_heads"],
        head_dim=hf.get("d_kv", 64),
        ffn_hidden_size=hf["d_ff"],
        vocab_size=hf["vocab_size"],
        seq_len=hf.get("n_positions", 512),
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        dropout=hf.get("dropout_rate", 0.1),
        norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        activation=ACTIVATIONS[activation],
        tie_embeddings=bool(tied),
        scale_decoder_output=bool(scaled),
        decoder_start_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)) or 0,
    )


def hf_config_from_model(config: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
    """The HF `config.json` dict of a megaloom T5 model (`common`: the shared fields)."""
    return dict(
        architectures=list(ARCHITECTURES),
        model_type="t5",
        num_layers=config.num_layers,
        num_decoder_layers=config.decoder_layers,
        d_model=config.hidden_size,
        d_kv=config.head_dim,
        d_ff=config.ffn_hidden_size,
        num_heads=config.num_heads,
        n_positions=config.seq_len,
        relative_attention_num_buckets=config.relative_buckets,
        relative_attention_max_distance=config.relative_max_distance,
        dropout_rate=config.dropout,
        layer_norm_epsilon=config.norm_eps,
        initializer_factor=1.0,
        feed_forward_proj=EXPORT_ACTIVATIONS[config.activation],
        is_encoder_decoder=True,
        decoder_start_token_id=config.decoder_start_id,
        pad_token_id=config.decoder_start_id,
        **common,
        scale_decoder_outputs=bool(config.scale_decoder_output),
    )


def _mlp(ours: str, theirs: str, config: ModelConfig) -> list[Pair]:
    if config.activation in ("geglu", "swiglu"):
        pairs = [("gate", "wi_0"), ("up", "wi_1"), ("down", "wo")]
    else:
        pairs = [("up", "wi"), ("down", "wo")]
    return [(f"{ours}.mlp.{a}.weight", f"{theirs}.DenseReluDense.{b}.weight", False)
            for a, b in pairs]


def layer_pairs(config: ModelConfig, i: int) -> list[Pair]:
    """Encoder layer `i`: self-attention (q, k, v fused apart) and MLP."""
    ours, hf = f"layers.{i}", f"encoder.block.{i}.layer"
    return [(f"{ours}.attn_norm.weight", f"{hf}.0.layer_norm.weight", False),
            (f"{ours}.attn.proj.weight", f"{hf}.0.SelfAttention.o.weight", False),
            (f"{ours}.mlp_norm.weight", f"{hf}.1.layer_norm.weight", False),
            *_mlp(ours, f"{hf}.1", config)]


def decoder_layer_pairs(config: ModelConfig, i: int) -> list[Pair]:
    """Decoder layer `i`: self-attention, cross-attention (q, k, v, o kept apart) and MLP."""
    ours, hf = f"decoder_layers.{i}", f"decoder.block.{i}.layer"
    cross = [(f"{ours}.cross_attn.{a}.weight", f"{hf}.1.EncDecAttention.{b}.weight", False)
             for a, b in (("q", "q"), ("k", "k"), ("v", "v"), ("proj", "o"))]
    return [(f"{ours}.attn_norm.weight", f"{hf}.0.layer_norm.weight", False),
            (f"{ours}.attn.proj.weight", f"{hf}.0.SelfAttention.o.weight", False),
            (f"{ours}.cross_norm.weight", f"{hf}.1.layer_norm.weight", False), *cross,
            (f"{ours}.mlp_norm.weight", f"{hf}.2.layer_norm.weight", False),
            *_mlp(ours, f"{hf}.2", config)]


def top_pairs(config: ModelConfig) -> list[Pair]:
    bias = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    pairs = [("embed.weight", "shared.weight", False),
             ("encoder_position_bias.weight", f"encoder.{bias}", False),
             ("decoder_position_bias.weight", f"decoder.{bias}", False),
             ("encoder_norm.weight", "encoder.final_layer_norm.weight", False),
             ("final_norm.weight", "decoder.final_layer_norm.weight", False)]
    if not config.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight", False))
    return pairs


def all_pairs(config: ModelConfig) -> list[Pair]:
    return (top_pairs(config)
            + [p for i in range(config.num_layers) for p in layer_pairs(config, i)]
            + [p for i in range(config.decoder_layers) for p in decoder_layer_pairs(config, i)])


def qkv_hf_names(config: ModelConfig, i: int, kind: str, stack: str = "layers") -> list[str]:
    side = "decoder" if stack == "decoder_layers" else "encoder"
    return [f"{side}.block.{i}.layer.0.SelfAttention.{p}.{kind}" for p in ("q", "k", "v")]


def ignored(config: ModelConfig) -> tuple[str, ...]:
    """Copies of the shared embedding (each stack's `embed_tokens`) hold nothing new."""
    return ALIASES


def export_aliases(config: ModelConfig) -> list[tuple[str, str]]:
    return []
