"""The model registry: one entry per family (GPT decoders, BERT encoders, T5
encoder-decoders), so the checkpoint reader, `parallelize`, the planner, Hugging Face interop
and the commands ask the family instead of naming a model class.

A `Family` says which `model.arch` values it covers, how to build its module (imported only
when built, so the planner and the CLI stay free of torch), its Hugging Face adapter module
(`megaloom.interop.*`: config.json mapping and tensor names), the `task.name`s it trains, the
parameters it adds beyond the decoder's trunk (for the planner's closed forms), and whether it
generates text (the engine, `serve`, `evaluate`'s likelihood scoring). A new family is a new
module plus one `register` call here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from megaloom.config import ModelConfig
from megaloom.errors import MegaloomError


@dataclass(frozen=True)
class ExtraParameters:
    """Parameters a family adds to the decoder trunk's closed form (`plan.params`):
    replicated ones on the first stage (embeddings) and on the last (head), and head
    parameters split over tp (vocabulary-parallel biases)."""

    embedding: int = 0
    head_replicated: int = 0
    head_sharded: int = 0


@dataclass(frozen=True)
class Family:
    name: str
    archs: tuple[str, ...]
    model_class: str  # "module:Class"
    hf_adapter: str | None  # its Hugging Face tensor mapping (None: interop.weights' tables)
    tasks: tuple[str, ...]
    generates: bool
    extra_parameters: Callable[[ModelConfig], ExtraParameters]

    def build(self, config: ModelConfig):
        """The plain single-process module of `config` (on torch's current default device)."""
        module, name = self.model_class.split(":")
        return getattr(importlib.import_module(module), name)(config)

    def require_generation(self, what: str) -> None:
        if not self.generates:
            raise MegaloomError(f"{what} needs a model that generates text; model.arch="
                                f"{'/'.join(self.archs)} is an encoder (fine-tune it with "
                                "megaloom finetune --task classify, evaluate --task classify)")


def _no_extras(config: ModelConfig) -> ExtraParameters:
    return ExtraParameters()


def _bert_extras(config: ModelConfig) -> ExtraParameters:
    """Token types, the embedding norm (post-norm), and the heads: masked-LM transform
    (dense + norm) and vocabulary bias, pooler, sentence-order or classifier head."""
    h = config.hidden_size
    norm = h * (2 if config.norm == "layernorm" and config.bias else 1)
    embedding = config.type_vocab_size * h + (norm if config.norm_position == "post" else 0)
    pooler = h * h + h if (config.num_labels or config.binary_head) else 0
    if config.num_labels:
        return ExtraParameters(embedding, pooler, config.num_labels)  # classifier bias
    order = 2 * h + 2 if config.binary_head else 0
    return ExtraParameters(embedding, h * h + h + norm + pooler + order,
                           config.padded_vocab_size)


def _t5_extras(config: ModelConfig) -> ExtraParameters:
    """The decoder stack (its layers with cross-attention: q, k, v, output and a norm), the
    two relative-position tables (sharded over heads) and the encoder's final norm. T5 has
    no pipeline split, so everything counts on the one stage."""
    h, inner = config.hidden_size, config.num_heads * config.head_dim
    from megaloom.plan.params import layer_parameters  # the plain decoder layer's closed form

    layer = layer_parameters(config)
    sharded = config.decoder_layers * (layer.sharded + 4 * h * inner)
    replicated = config.decoder_layers * (layer.replicated + h) + h
    return ExtraParameters(0, replicated, sharded + 2 * config.relative_buckets * config.num_heads)


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> None:
    for arch in family.archs:
        FAMILIES[arch] = family


register(Family("gpt", ("gpt2", "llama"), "megaloom.model.gpt:GPT", None,
                ("lm", "distill", "sft", "classify"), True, _no_extras))
register(Family("bert", ("bert",), "megaloom.model.bert:BERT", "megaloom.interop.bert",
                ("mlm", "classify"), False, _bert_extras))
register(Family("t5", ("t5",), "megaloom.model.t5:T5", "megaloom.interop.t5",
                ("span", "sft"), True, _t5_extras))


def family_of(config: ModelConfig | str) -> Family:
    arch = config if isinstance(config, str) else config.arch
    if arch not in FAMILIES:
        raise MegaloomError(f"model.arch={arch!r} is not a registered family "
                            f"(known: {', '.join(FAMILIES)})")
    return FAMILIES[arch]


def build_model(config: ModelConfig):
    """The plain module of `config`, whatever its family."""
    return family_of(config).build(config)
