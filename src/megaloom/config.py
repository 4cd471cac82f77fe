"""Typed run configuration: the one source of truth for every recipe, CLI override and saved run.

Owns the dataclasses (`ModelConfig`, `DataConfig`, `TrainConfig`, `ParallelConfig`, `Config`),
loading YAML recipes, applying `key.sub=value` overrides, strict validation (unknown keys and
wrong types are errors that name the key and suggest close matches) and saving the resolved
config beside a run. It must not import torch or build anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration problem, with a message that names the offending key."""


ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(
        position_embedding="learned",
        norm="layernorm",
        activation="gelu_tanh",
        bias=True,
        tie_embeddings=True,
    ),
    "llama": dict(
        position_embedding="rope",
        norm="rmsnorm",
        activation="swiglu",
        bias=False,
        tie_embeddings=False,
    ),
    "bert": dict(
        position_embedding="learned",
        norm="layernorm",
        activation="gelu",
        bias=True,
        tie_embeddings=True,
        norm_position="post",
        causal=False,
    ),
    "t5": dict(
        position_embedding="relative",
        norm="rmsnorm",
        activation="relu",
        bias=False,
        tie_embeddings=True,
        causal=False,
    ),
}
GATED_ACTIVATIONS = ("swiglu", "geglu")  # MLPs with a gate projection beside `up`
FLAVOUR_DEFAULTS: dict[str, Any] = {"norm_position": "pre", "causal": True}


@dataclass
class ModelConfig:
    """Shape and flavour of a model: a GPT decoder, a BERT encoder or a T5 encoder-decoder.

    `arch` picks the family (`megaloom.model.registry`) and fills every flavour field left as
    None: `gpt2` (learned positions, LayerNorm, GELU, biases, tied embeddings), `llama` (RoPE,
    RMSNorm, SwiGLU, no biases, untied) or `bert` (a bidirectional encoder: learned positions
    and `type_vocab_size` token types, LayerNorm after each residual add (`norm_position:
    post`, Hugging Face `BertForMaskedLM`; `pre` is Megatron's BERT), erf GELU, tied LM head).
    `t5` is an encoder of `num_layers` and a decoder of `decoder_layers` (default the same)
    with cross-attention, T5's relative position buckets (`relative_buckets`,
    `relative_max_distance`), bias-free RMSNorm and a ReLU MLP (v1.0; `activation: geglu` is
    v1.1's gated GELU); `scale_decoder_output` multiplies the decoder output by hidden^-0.5
    before the head (v1.0), `decoder_start_id` is the token the decoder starts from (T5: pad
    = 0), and `decoder_seq_len` bounds the decoder's length in generation.
    `binary_head` adds BERT's sentence-order head on the pooled first token.
    `num_labels` > 0 makes a sequence classifier: the head maps the hidden state to that many
    label scores (never tied to the embedding) instead of to the vocabulary.
    `init_from` starts training from existing weights (a megaloom checkpoint or `hf:DIR`); the
    shape then comes from that checkpoint and only `dropout` is taken from this config.
    """

    arch: Literal["gpt2", "llama", "bert", "t5"] = "gpt2"
    num_layers: int = 4
    decoder_layers: int | None = None  # t5 only (default: num_layers)
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int | None = None
    head_dim: int | None = None  # default hidden_size / num_heads
    ffn_hidden_size: int | None = None
    seq_len: int = 256
    vocab_size: int = 50257
    make_vocab_size_divisible_by: int = 128
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    position_embedding: Literal["learned", "rope", "relative"] | None = None
    norm: Literal["layernorm", "rmsnorm"] | None = None
    activation: Literal["gelu_tanh", "gelu", "swiglu", "relu", "geglu"] | None = None
    bias: bool | None = None
    tie_embeddings: bool | None = None
    norm_position: Literal["pre", "post"] | None = None
    causal: bool | None = None
    type_vocab_size: int = 0  # token types (BERT segments); 0: none
    binary_head: bool = False
    num_labels: int = 0
    relative_buckets: int = 32
    relative_max_distance: int = 128
    scale_decoder_output: bool | None = None
    decoder_start_id: int = 0
    decoder_seq_len: int | None = None
    init_from: str | None = None

    def __post_init__(self) -> None:
        for name, value in {**FLAVOUR_DEFAULTS, **ARCH_DEFAULTS[self.arch]}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.arch == "bert" and not self.type_vocab_size:
            self.type_vocab_size = 2
        if self.arch == "t5":
            for name, value in (("decoder_layers", self.num_layers),
                                ("decoder_seq_len", self.seq_len),
                                ("scale_decoder_output", bool(self.tie_embeddings))):
                if getattr(self, name) is None:
                    setattr(self, name, value)
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None and self.num_heads >= 1 and self.hidden_size % self.num_heads == 0:
            self.head_dim = self.hidden_size // self.num_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = default_ffn_hidden_size(self.hidden_size, self.activation)

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.make_vocab_size_divisible_by
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    @property
    def attention_scale(self) -> float | None:
        """Scale of attention scores: None is 1/sqrt(head_dim); T5 does not scale them."""
        return 1.0 if self.arch == "t5" else None

    @property
    def num_blocks(self) -> int:
        """Transformer layers of the whole model: encoder plus decoder layers for T5."""
        return self.num_layers + (self.decoder_layers or 0)

    @property
    def tied_head(self) -> bool:
        """Whether the output head is the token embedding (a language model with tied weights)."""
        return bool(self.tie_embeddings) and self.num_labels == 0

    @property
    def head_size(self) -> int:
        """Outputs of the head: the padded vocabulary, or the labels of a classifier."""
        return self.num_labels or self.padded_vocab_size

    def validate(self) -> None:
        _require(self.num_layers >= 1, "model.num_layers", "must be >= 1")
        _require(self.hidden_size >= 1, "model.hidden_size", "must be >= 1")
        _require(self.num_heads >= 1, "model.num_heads", "must be >= 1")
        _require(
            self.head_dim is not None,
            "model.hidden_size",
            f"{self.hidden_size} is not divisible by model.num_heads={self.num_heads} "
            "(or set model.head_dim)",
        )
        _require(self.head_dim >= 1, "model.head_dim", "must be >= 1")
        _require(
            1 <= self.num_kv_heads <= self.num_heads and self.num_heads % self.num_kv_heads == 0,
            "model.num_kv_heads",
            f"{self.num_kv_heads} must divide model.num_heads={self.num_heads}",
        )
        _require(
            self.position_embedding != "rope" or self.head_dim % 2 == 0,
            "model.hidden_size",
            "RoPE needs an even head dimension (model.head_dim, default hidden_size / num_heads)",
        )
        _require(self.seq_len >= 1, "model.seq_len", "must be >= 1")
        _require(self.vocab_size >= 1, "model.vocab_size", "must be >= 1")
        _require(self.make_vocab_size_divisible_by >= 1, "model.make_vocab_size_divisible_by",
                 "must be >= 1")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _require(self.norm_eps > 0, "model.norm_eps", "must be > 0")
        _require(self.num_labels >= 0, "model.num_labels", "must be >= 0 (0: language model)")
        _require(self.ffn_hidden_size >= 1, "model.ffn_hidden_size", "must be >= 1")
        _require(self.init_std > 0, "model.init_std", "must be > 0")
        _require(self.rope_theta > 0, "model.rope_theta", "must be > 0")
        _require(self.type_vocab_size >= 0, "model.type_vocab_size", "must be >= 0")
        encoder, t5 = self.arch == "bert", self.arch == "t5"
        _require(not (encoder and self.causal), "model.causal", "a BERT encoder attends both "
                 "ways; model.causal=true is only for decoders (model.arch=gpt2 or llama)")
        _require(not (t5 and self.causal), "model.causal", "T5's encoder attends both ways "
                 "and its decoder is always causal; model.causal is for model.arch=gpt2/llama")
        _require(encoder or t5 or self.causal, "model.causal", f"model.arch={self.arch} is a "
                 "decoder and must be causal (a bidirectional encoder is model.arch=bert)")
        _require(not (encoder and self.activation not in ("gelu", "gelu_tanh")),
                 "model.activation",
                 f"model.arch=bert uses a GELU MLP ('gelu' or 'gelu_tanh'), not "
                 f"{self.activation!r}")
        _require(t5 or self.activation not in ("relu", "geglu"), "model.activation",
                 f"{self.activation!r} is T5's MLP (model.arch=t5); decoders use 'gelu', "
                 "'gelu_tanh' or 'swiglu'")
        _require(not t5 or self.activation in ("relu", "gelu", "geglu", "swiglu"),
                 "model.activation", f"model.arch=t5 has a 'relu', 'gelu', 'geglu' or 'swiglu' "
                 f"MLP, not {self.activation!r}")
        _require((self.position_embedding == "relative") == t5, "model.position_embedding",
                 "relative position buckets are T5's (model.arch=t5), which has no other")
        _require(not t5 or (self.norm == "rmsnorm" and not self.bias), "model.norm",
                 "model.arch=t5 uses bias-free RMSNorm (model.norm=rmsnorm, model.bias=false)")
        _require(encoder or self.norm_position == "pre", "model.norm_position",
                 f"model.arch={self.arch} puts norms before each sublayer ('pre'); "
                 "'post' is for model.arch=bert")
        _require(t5 or not (self.decoder_layers or self.decoder_seq_len
                            or self.scale_decoder_output), "model.decoder_layers",
                 "decoder_layers, decoder_seq_len and scale_decoder_output belong to "
                 "model.arch=t5")
        if t5:
            _require(self.decoder_layers >= 1, "model.decoder_layers", "must be >= 1")
            _require(self.decoder_seq_len >= 1, "model.decoder_seq_len", "must be >= 1")
            _require(self.relative_buckets >= 4 and self.relative_buckets % 2 == 0,
                     "model.relative_buckets", "must be an even number >= 4")
            _require(self.relative_max_distance > self.relative_buckets // 2,
                     "model.relative_max_distance", "must exceed half of model.relative_buckets")
            _require(self.num_kv_heads == self.num_heads, "model.num_kv_heads",
                     "T5 has no grouped-query attention (num_kv_heads = num_heads)")
            _require(not self.num_labels, "model.num_labels",
                     "T5 classifies as text to text (megaloom finetune --task sft); "
                     "num_labels is for the GPT and BERT families")
            _require(0 <= self.decoder_start_id < self.vocab_size, "model.decoder_start_id",
                     f"must be a token id below model.vocab_size={self.vocab_size}")
        _require(encoder or not (self.type_vocab_size or self.binary_head),
                 "model.type_vocab_size" if self.type_vocab_size else "model.binary_head",
                 "token types and the sentence-order head belong to model.arch=bert")
        _require(not (self.binary_head and self.num_labels), "model.binary_head",
                 "a classifier (model.num_labels > 0) has no sentence-order head")
        _require_finite(self, "model")


def default_ffn_hidden_size(hidden_size: int, activation: str) -> int:
    """4h for GELU, ReLU and GEGLU; for SwiGLU 2/3 of 4h rounded up to a multiple of 256
    (Llama's rule)."""
    if activation != "swiglu":
        return 4 * hidden_size
    size = int(2 * 4 * hidden_size / 3)
    return 256 * ((size + 255) // 256)


@dataclass
class DataConfig:
    """Where training tokens come from.

    `prefixes` takes Megatron's form: a list of `.bin`/`.idx` path prefixes, optionally
    alternating with weights (`[0.3, data/a, 0.7, data/b]`). Empty means the embedded default
    corpus. `split` divides documents into train/valid/test by the given proportions.
    """

    prefixes: list[Any] = field(default_factory=list)
    split: str = "969,30,1"
    tokenizer: str | None = None
    cache_dir: str = ".megaloom-cache"


PROJECTIONS = ("qkv", "proj", "up", "gate", "down")
PRUNING_TARGETS = (*PROJECTIONS, "embed", "lm_head")


@dataclass
class PruningConfig:
    """Gradual magnitude pruning while training (Zhu & Gupta 2017): from `start_step` every
    `interval` steps until `end_step`, each target weight's smallest-magnitude entries are
    masked to reach the cubic schedule's sparsity, ending at `sparsity`. Off while `sparsity`
    is 0. Targets: the projections by default; `embed` and `lm_head` opt-in; norms never."""

    sparsity: float = 0.0
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int | None = None  # default: train.max_steps
    interval: int = 10
    targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))

    @property
    def enabled(self) -> bool:
        return self.sparsity > 0

    def validate(self, max_steps: int) -> None:
        _require(0.0 <= self.sparsity < 1.0, "train.pruning.sparsity", "must be in [0, 1)")
        _require(0.0 <= self.initial_sparsity <= self.sparsity or not self.enabled,
                 "train.pruning.initial_sparsity", "must be in [0, train.pruning.sparsity]")
        _require(self.start_step >= 0, "train.pruning.start_step", "must be >= 0")
        _require(self.interval >= 1, "train.pruning.interval", "must be >= 1")
        end = max_steps if self.end_step is None else self.end_step
        _require(end >= self.start_step, "train.pruning.end_step",
                 f"must be >= train.pruning.start_step={self.start_step}, got {end}")
        unknown = [t for t in self.targets if t not in PRUNING_TARGETS]
        _require(not unknown, "train.pruning.targets",
                 f"unknown weight(s) {unknown}; choose from {', '.join(PRUNING_TARGETS)}")
        _require(bool(self.targets), "train.pruning.targets", "must name at least one weight")
        _require_finite(self, "train.pruning")


@dataclass
class TrainConfig:
    """Optimisation, schedule, precision, logging and checkpointing of a training run."""

    max_steps: int = 200
    micro_batch_size: int = 8
    global_batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    lr_decay_steps: int | None = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    initial_loss_scale: float = 65536.0
    loss_scale_window: int = 1000
    activation_checkpointing: bool = False
    seed: int = 1234
    device: str = "auto"
    out_dir: str = "runs/tiny"
    log_interval: int = 1
    eval_interval: int = 50
    eval_iters: int = 10
    save_interval: int = 100
    keep_last: int = 2
    tensorboard: bool = False
    exit_at_step: int | None = None
    peak_tflops: float | None = None  # per device, for MFU (default: the GPU table; CPU none)
    pruning: PruningConfig = field(default_factory=PruningConfig)

    def validate(self) -> None:
        _require(self.max_steps >= 1, "train.max_steps", "must be >= 1")
        _require(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        _require(self.global_batch_size >= 1, "train.global_batch_size", "must be >= 1")
        _require(
            self.global_batch_size % self.micro_batch_size == 0,
            "train.global_batch_size",
            f"{self.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{self.micro_batch_size}",
        )
        _require(self.lr > 0, "train.lr", "must be > 0")
        _require(0 <= self.min_lr <= self.lr, "train.min_lr", "must be in [0, train.lr]")
        _require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 disables clipping)")
        _require(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        _require(self.eval_interval >= 1, "train.eval_interval", "must be >= 1")
        _require(self.save_interval >= 1, "train.save_interval", "must be >= 1")
        _require(self.log_interval >= 1, "train.log_interval", "must be >= 1")
        _require(self.exit_at_step is None or self.exit_at_step >= 1, "train.exit_at_step",
                 "must be >= 1")
        _require(self.lr_decay_steps is None or self.lr_decay_steps >= 1,
                 "train.lr_decay_steps", "must be >= 1 (or unset: max_steps - warmup_steps)")
        _require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _require(0 <= self.adam_beta1 < 1, "train.adam_beta1", "must be in [0, 1)")
        _require(0 <= self.adam_beta2 < 1, "train.adam_beta2", "must be in [0, 1)")
        _require(self.adam_eps > 0, "train.adam_eps", "must be > 0")
        _require(self.initial_loss_scale > 0, "train.initial_loss_scale", "must be > 0")
        _require(self.loss_scale_window >= 1, "train.loss_scale_window", "must be >= 1")
        _require(self.eval_iters >= 1, "train.eval_iters", "must be >= 1")
        _require(self.peak_tflops is None or self.peak_tflops > 0, "train.peak_tflops",
                 "must be > 0 (or unset: the GPU table's peak)")
        self.pruning.validate(self.max_steps)
        _require_finite(self, "train")


@dataclass
class ParallelConfig:
    """Parallel layout: tensor (`tp`) and pipeline (`pp`) sizes; data parallelism takes the rest
    of the world size. `vpp` > 1 gives each pipeline rank that many interleaved layer chunks."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    timeout_s: float = 600.0

    def validate(self) -> None:
        _require(self.timeout_s > 0, "parallel.timeout_s", "must be > 0 (seconds a rank waits "
                 "in a collective before failing)")
        _require_finite(self, "parallel")


LORA_TARGETS = PROJECTIONS


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA): `rank` 0 trains every weight (full fine-tuning); `rank` > 0
    freezes the model and trains `B @ A` (scaled by `alpha / rank`) beside each `targets`
    projection (`qkv`, `proj`, `up`, `gate`, `down`)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def validate(self) -> None:
        _require(self.rank >= 0, "task.lora.rank", "must be >= 0 (0: full fine-tuning)")
        _require(self.alpha > 0, "task.lora.alpha", "must be > 0")
        _require(0.0 <= self.dropout < 1.0, "task.lora.dropout", "must be in [0, 1)")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        _require(not unknown, "task.lora.targets",
                 f"unknown module(s) {unknown}; choose from {', '.join(LORA_TARGETS)}")
        _require(bool(self.targets), "task.lora.targets", "must name at least one module")
        _require_finite(self, "task.lora")


@dataclass
class DistillConfig:
    """Knowledge distillation (`task.name=distill` in `megaloom train`): the loss per token is
    `temperature`^2 x KL(teacher || student) over the vocabulary at that temperature (Hinton
    et al. 2015), plus `hard_weight` x the next-token cross-entropy on the data. `teacher` is
    a megaloom run or checkpoint, or `hf:DIR`, with the student's vocabulary."""

    teacher: str | None = None
    temperature: float = 1.0
    hard_weight: float = 0.0

    def validate(self) -> None:
        _require(self.temperature > 0, "task.distill.temperature", "must be > 0")
        _require(self.hard_weight >= 0, "task.distill.hard_weight", "must be >= 0")
        _require_finite(self, "task.distill")


@dataclass
class MaskedLMConfig:
    """BERT's masked-LM objective (`task.name=mlm`): `rate` of the tokens are chosen (as
    n-grams of up to `max_ngram` tokens or whole words when `whole_word`), `mask` of those are
    replaced by `mask_token`, `random` by a random token, the rest kept. Each sample is
    `[CLS] A [SEP] B [SEP]` cut from one token window; with `model.binary_head` the halves are
    swapped half the time and the sentence-order head learns which."""

    rate: float = 0.15
    mask: float = 0.8
    random: float = 0.1
    max_ngram: int = 1
    whole_word: bool = False
    mask_token: str = "[MASK]"
    cls_token: str = "[CLS]"
    sep_token: str = "[SEP]"

    def validate(self) -> None:
        _require(0 < self.rate < 1, "task.mlm.rate", "must be in (0, 1)")
        _require(self.mask >= 0 and self.random >= 0 and self.mask + self.random <= 1,
                 "task.mlm.mask", "task.mlm.mask and task.mlm.random must be >= 0 and sum "
                 "to at most 1")
        _require(self.max_ngram >= 1, "task.mlm.max_ngram", "must be >= 1")
        _require_finite(self, "task.mlm")


@dataclass
class SpanCorruptionConfig:
    """T5's span corruption (`task.name=span`): `density` of each window's tokens are hidden
    in spans of mean length `mean_span`; each span becomes one sentinel (`<extra_id_i>`, the
    tokenizer holds `sentinels` of them) in the encoder input, and the decoder writes each
    sentinel followed by the tokens it hides. Windows are sized so the encoder input is
    `model.seq_len` tokens."""

    density: float = 0.15
    mean_span: float = 3.0
    sentinels: int = 100

    def validate(self) -> None:
        _require(0 < self.density < 1, "task.span.density", "must be in (0, 1)")
        _require(self.mean_span >= 1, "task.span.mean_span", "must be >= 1")
        _require(self.sentinels >= 1, "task.span.sentinels", "must be >= 1")
        _require_finite(self, "task.span")


@dataclass
class TaskConfig:
    """What the trainer optimises. `lm`: next-token pretraining on `data.prefixes`.
    `distill`: the same data, learning the `distill.teacher`'s distributions. `mlm`: BERT's
    masked-LM (and sentence-order) pretraining on the same data (`mlm`). `span`: T5's span
corruption on the same data (`span`). `sft`:
    supervised fine-tuning on JSONL `prompt_field`/`response_field` pairs or chat
    `messages_field` lists (loss on the response and its end token only). `classify`: a
    sequence classifier on JSONL `text_field`/`label_field` (`labels` is filled from the
    training data and saved with the model).

    `template`: how SFT prompts are written: `auto` renders `messages` with the tokenizer's
    chat template (megaloom's default when it has none) and uses `prompt` text as is;
    `tokenizer` requires the tokenizer's own template; `default` always megaloom's; `none`
    never renders. `pack` puts several samples in one row (positions restart, no attention
    across samples). Samples longer than `model.seq_len` are cut (`overlong: truncate`, the
    prompt loses its start) or are an error (`reject`). `epochs` sets `train.max_steps`.
    """

    name: Literal["lm", "distill", "sft", "classify", "mlm", "span"] = "lm"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    text_field: str = "text"
    label_field: str = "label"
    template: Literal["auto", "tokenizer", "default", "none"] = "auto"
    pack: bool = True
    overlong: Literal["truncate", "reject"] = "truncate"
    epochs: float | None = None
    labels: list[str] = field(default_factory=list)
    class_weights: list[float] = field(default_factory=list)
    eval_samples: int = 8
    max_new_tokens: int = 64
    lora: LoraConfig = field(default_factory=LoraConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    mlm: MaskedLMConfig = field(default_factory=MaskedLMConfig)
    span: SpanCorruptionConfig = field(default_factory=SpanCorruptionConfig)

    def validate(self) -> None:
        self.lora.validate()
        self.distill.validate()
        self.mlm.validate()
        self.span.validate()
        _require(self.name != "distill" or self.distill.teacher is not None,
                 "task.distill.teacher", "is required with task.name=distill (a run, "
                 "checkpoint or hf:DIR)")
        _require(self.epochs is None or self.epochs > 0, "task.epochs", "must be > 0")
        _require(self.eval_samples >= 0, "task.eval_samples", "must be >= 0")
        _require(self.max_new_tokens >= 1, "task.max_new_tokens", "must be >= 1")
        _require(all(w > 0 for w in self.class_weights), "task.class_weights",
                 "every weight must be > 0")
        _require(not self.class_weights or len(self.class_weights) == len(self.labels)
                 or not self.labels, "task.class_weights",
                 f"{len(self.class_weights)} weights for {len(self.labels)} labels")


@dataclass
class Config:
    """A whole run: model, data, training, parallel layout and task."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def validate(self) -> Config:
        """Check every section, then the layout against the model (`layout_rules`; dp is
        only known at launch, so its rules wait for the trainer)."""
        from megaloom.layout_rules import LayoutSpec, layout_problems

        self.model.validate()
        self.train.validate()
        self.parallel.validate()
        self.task.validate()
        from megaloom.model.registry import family_of

        family = family_of(self.model)
        _require(self.task.name in family.tasks, "task.name", f"{self.task.name!r} is not a "
                 f"task of model.arch={self.model.arch} (choose {', '.join(family.tasks)})")
        _require(self.model.num_labels == 0 or self.task.name == "classify",
                 "model.num_labels", f"is {self.model.num_labels} for task.name="
                 f"{self.task.name!r} (only a classifier has labels)")
        _require(not (self.train.pruning.enabled and self.task.lora.rank),
                 "train.pruning.sparsity", "cannot prune under LoRA (task.lora.rank > 0): "
                 "the merged adapters would fill the pruned weights again")
        par, train = self.parallel, self.train
        spec = LayoutSpec(tp=par.tp, pp=par.pp, vpp=par.vpp, dp=None,
                          sequence_parallel=par.sequence_parallel,
                          activation_checkpointing=train.activation_checkpointing)
        for _key, message in layout_problems(self.model, spec)[:1]:
            raise ConfigError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML, atomically."""
        from megaloom.utils.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _require_finite(section: object, name: str) -> None:
    """Every float field of `section` is a finite number (no inf, no nan)."""
    for item in fields(section):
        value = getattr(section, item.name)
        if isinstance(value, float):
            _require(math.isfinite(value), f"{name}.{item.name}", f"must be finite, got {value}")


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML recipe (or the defaults when `path` is None), apply `key.sub=value`
    overrides, and return a validated `Config`."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_mapping(path)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return config_from_dict(raw).validate()


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """Split `a.b=value`; the value is parsed as YAML (so `3e-4`, `true`, `[1, 2]` work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build a `Config` from nested plain data, checking every key and type."""
    return _build(Config, raw, prefix="")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, "
                          f"got {type(raw).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key {full!r}{_suggest(key, known, prefix)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, prefix=f"{full}.")
        else:
            kwargs[key] = _coerce(value, hint, full)
    try:
        return cls(**kwargs)
    except KeyError as exc:
        raise ConfigError(f"{prefix}arch: unknown value {exc}") from exc


def _suggest(key: str, known: set[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.5)
    if close:
        return "; did you mean " + " or ".join(repr(prefix + c) for c in close) + "?"
    return "; valid keys: " + ", ".join(sorted(prefix + k for k in known))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the annotation `hint`; ints are accepted where floats are wanted."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_hint,) = get_args(hint) or (Any,)
        return [_coerce(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - guards new annotation kinds
        raise ConfigError(f"{key}: unsupported annotation {hint!r}")
    raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "LoraConfig",
    "ModelConfig",
    "ParallelConfig",
    "TaskConfig",
    "TrainConfig",
    "config_from_dict",
    "load_config",
    "parse_override",
    "read_yaml_mapping",
]
