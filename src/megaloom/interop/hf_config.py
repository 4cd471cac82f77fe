"""`config.json` of Hugging Face GPT-2 and Llama models <-> megaloom's `ModelConfig`.

Owns the field mapping and the refusal of everything megaloom cannot represent exactly: an
unknown architecture or a config field whose value changes the computation (rope scaling,
sliding windows, biases where the flavour has none, other activations, GPT-2's attention
scaling variants, cross-attention) raises
`UnsupportedModelError` naming the field, so a conversion never yields a silently wrong model.
Dropout is the one training-only knob: megaloom has a single rate, so differing HF rates are
reported and the largest is used.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from megaloom.config import ModelConfig
from megaloom.errors import CheckpointError, MegaloomError
from megaloom.interop import bert, t5

log = logging.getLogger(__name__)


class UnsupportedModelError(MegaloomError):
    """A Hugging Face model (or a megaloom model bound for HF) that cannot be converted exactly."""


CLASSIFIERS = {"gpt2": "GPT2ForSequenceClassification",
               "llama": "LlamaForSequenceClassification"}
ARCHITECTURES = {
    "gpt2": {"GPT2LMHeadModel", "GPT2Model", CLASSIFIERS["gpt2"]},
    "llama": {"LlamaForCausalLM", "LlamaModel", CLASSIFIERS["llama"]},
}

# Fields whose value, when present, must equal the one megaloom implements.
REQUIRED_VALUES: dict[str, dict[str, Any]] = {
    "gpt2": {
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "is_encoder_decoder": False,
    },
    "llama": {
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "sliding_window": None,
        "partial_rotary_factor": 1.0,
        "is_encoder_decoder": False,
    },
}

GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
EXPORT_ACTIVATIONS = {"gelu_tanh": "gelu_new", "gelu": "gelu"}

# What each flavour must look like to be written as that HF architecture.
EXPORT_FLAVOURS: dict[str, dict[str, Any]] = {
    "gpt2": dict(position_embedding="learned", norm="layernorm", bias=True),
    "llama": dict(position_embedding="rope", norm="rmsnorm", activation="swiglu", bias=False),
}


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (is this a Hugging Face model dir?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def model_config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """The megaloom `ModelConfig` equivalent to a HF GPT-2 or Llama `config.json` dict."""
    arch = hf.get("model_type")
    if arch in bert.MODEL_TYPES:
        return _bert_fields(hf, source)
    if arch in t5.MODEL_TYPES:
        return _family_fields(lambda: t5.model_config_from_hf(hf), source)
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"{source}: model_type={arch!r} is not supported "
                                    f"(supported: {', '.join(ARCHITECTURES)})")
    for name in hf.get("architectures") or []:
        if name not in ARCHITECTURES[arch]:
            raise UnsupportedModelError(
                f"{source}: architectures={name!r} is not supported for {arch} "
                f"(supported: {', '.join(sorted(ARCHITECTURES[arch]))})")
    for key, expected in REQUIRED_VALUES[arch].items():
        if hf.get(key, expected) != expected:
            raise UnsupportedModelError(f"{source}: unsupported {key}={hf[key]!r} "
                                        f"(megaloom implements {key}={expected!r})")
    try:
        config = _gpt2_fields(hf, source) if arch == "gpt2" else _llama_fields(hf, source)
        if CLASSIFIERS[arch] in (hf.get("architectures") or []):
            config.num_labels = len(hf_labels(hf))
        config.validate()
    except KeyError as exc:
        raise CheckpointError(f"{source}: missing field {exc}") from exc
    except ValueError as exc:  # ConfigError from validate()
        raise UnsupportedModelError(f"{source}: {exc}") from exc
    return config


def _bert_fields(hf: dict[str, Any], source: str) -> ModelConfig:
    names = bert.class_names(hf["model_type"])
    for name in hf.get("architectures") or []:
        if name not in names.values():
            raise UnsupportedModelError(
                f"{source}: architectures={name!r} is not supported for {hf['model_type']} "
                f"(supported: {', '.join(sorted(names.values()))})")
    return _family_fields(lambda: bert.model_config_from_hf(hf, source, len(hf_labels(hf))),
                          source)


def _family_fields(convert, source: str) -> ModelConfig:
    """A family adapter's config conversion, validated, its errors naming `source`."""
    try:
        config = convert()
        config.validate()
    except KeyError as exc:
        raise CheckpointError(f"{source}: missing field {exc}") from exc
    except ValueError as exc:
        raise UnsupportedModelError(f"{source}: {exc}") from exc
    return config


def hf_labels(hf: dict[str, Any]) -> list[str]:
    """A classifier's label names in id order (`id2label`, else `LABEL_i` for `num_labels`)."""
    id2label = hf.get("id2label") or {}
    if id2label:
        return [str(id2label[k]) for k in sorted(id2label, key=int)]
    return [f"LABEL_{i}" for i in range(int(hf.get("num_labels", 2)))]


def _gpt2_fields(hf: dict[str, Any], source: str) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise UnsupportedModelError(
            f"{source}: unsupported activation_function={activation!r} "
            f"(supported: {', '.join(GPT2_ACTIVATIONS)})")
    hidden = hf["n_embd"]
    return ModelConfig(
        arch="gpt2",
        num_layers=hf["n_layer"],
        hidden_size=hidden,
        num_heads=hf["n_head"],
        ffn_hidden_size=hf.get("n_inner") or 4 * hidden,
        seq_len=hf["n_positions"],
        vocab_size=hf["vocab_size"],
        dropout=_dropout(hf, {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}, source),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
        activation=GPT2_ACTIVATIONS[activation],
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _llama_fields(hf: dict[str, Any], source: str) -> ModelConfig:
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    return ModelConfig(
        arch="llama",
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim"),
        ffn_hidden_size=hf["intermediate_size"],
        seq_len=hf.get("max_position_embeddings", 2048),
        vocab_size=hf["vocab_size"],
        dropout=_dropout(hf, {"attention_dropout": 0.0}, source),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(hf, source),
        init_std=hf.get("initializer_range", 0.02),
        tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def _rope_theta(hf: dict[str, Any], source: str) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or top-level `rope_theta` (4.x); any
    scaling in `rope_scaling` or `rope_parameters` other than plain RoPE is refused."""
    theta = float(hf.get("rope_theta", 10000.0))
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key)
        if params is None:
            continue
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise UnsupportedModelError(f"{source}: unsupported {key}.rope_type={rope_type!r} "
                                        f"(megaloom implements plain RoPE only)")
        extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise UnsupportedModelError(f"{source}: unsupported {key}.{extra[0]} "
                                        f"(megaloom implements plain RoPE with rope_theta only)")
        theta = float(params.get("rope_theta", theta))
    return theta


def _dropout(hf: dict[str, Any], defaults: dict[str, float], source: str) -> float:
    rates = {key: float(hf.get(key, default)) for key, default in defaults.items()}
    if len(set(rates.values())) > 1:
        log.warning("%s: megaloom has one dropout rate; %s differ, using the largest",
                    source, ", ".join(f"{k}={v:g}" for k, v in rates.items()))
    return max(rates.values())


def hf_config_from_model(
    config: ModelConfig,
    dtype: torch.dtype,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    labels: list[str] | None = None,
) -> dict[str, Any]:
    """The HF `config.json` dict for a megaloom model (GPT-2 or Llama by `config.arch`); a
    classifier (`num_labels` > 0) is written as `*ForSequenceClassification` with `labels`
    as `id2label` and the end-of-text id as `pad_token_id` (it pools at the last non-pad
    token, as megaloom does)."""
    arch = config.arch
    for field, expected in EXPORT_FLAVOURS.get(arch, {}).items():
        if getattr(config, field) != expected:
            raise UnsupportedModelError(
                f"model.{field}={getattr(config, field)!r} cannot be written as a Hugging Face "
                f"{arch} model (it needs model.{field}={expected!r})")
    common = dict(
        vocab_size=config.vocab_size,
        initializer_range=config.init_std,
        tie_word_embeddings=bool(config.tie_embeddings),
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        use_cache=True,
        dtype=str(dtype).removeprefix("torch."),
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if arch in ("bert", "t5"):
        adapter = bert if arch == "bert" else t5
        try:
            hf = adapter.hf_config_from_model(config, common)
        except ValueError as exc:
            raise UnsupportedModelError(str(exc)) from exc
        return _with_labels(config, labels, hf)
    if arch == "gpt2":
        if config.activation not in EXPORT_ACTIVATIONS:
            raise UnsupportedModelError(f"model.activation={config.activation!r} cannot be "
                                        f"written as a Hugging Face gpt2 model")
        if config.num_kv_heads != config.num_heads:
            raise UnsupportedModelError(
                f"model.num_kv_heads={config.num_kv_heads} cannot be written as a Hugging Face "
                f"gpt2 model (it has no grouped-query attention; use arch=llama)")
        if config.num_heads * config.head_dim != config.hidden_size:
            raise UnsupportedModelError(
                f"model.head_dim={config.head_dim} x model.num_heads={config.num_heads} != "
                f"model.hidden_size={config.hidden_size} cannot be written as a Hugging Face gpt2 "
                f"model (its attention width is n_embd)")
        return _with_labels(config, labels, dict(
            architectures=["GPT2LMHeadModel"],
            model_type="gpt2",
            n_layer=config.num_layers,
            n_embd=config.hidden_size,
            n_head=config.num_heads,
            n_inner=config.ffn_hidden_size,
            n_positions=config.seq_len,
            activation_function=EXPORT_ACTIVATIONS[config.activation],
            layer_norm_epsilon=config.norm_eps,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            **REQUIRED_VALUES["gpt2"],
            **common,
        ))
    if config.dropout > 0:
        log.warning("Hugging Face Llama has attention dropout only; model.dropout=%g is written "
                    "as attention_dropout (inference is unaffected)", config.dropout)
    return _with_labels(config, labels, dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        num_hidden_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        intermediate_size=config.ffn_hidden_size,
        max_position_embeddings=config.seq_len,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=None,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_dropout=config.dropout,
        pretraining_tp=1,
        **{k: v for k, v in REQUIRED_VALUES["llama"].items() if k != "partial_rotary_factor"},
        **common,
    ))


def _with_labels(config: ModelConfig, labels: list[str] | None, hf: dict[str, Any]
                 ) -> dict[str, Any]:
    if not config.num_labels:
        return hf
    labels = list(labels or [f"LABEL_{i}" for i in range(config.num_labels)])
    if len(labels) != config.num_labels:
        raise UnsupportedModelError(f"{len(labels)} label names for model.num_labels="
                                    f"{config.num_labels}")
    architectures = hf["architectures"] if config.arch == "bert" else [CLASSIFIERS[config.arch]]
    pad = hf.get("pad_token_id") if config.arch == "bert" else hf["eos_token_id"]
    return {**hf, "architectures": architectures, "num_labels": config.num_labels,
            "id2label": dict(enumerate(labels)), "label2id": {v: i for i, v in enumerate(labels)},
            "pad_token_id": pad, "problem_type": "single_label_classification"}
