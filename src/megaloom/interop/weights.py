"""Tensor mapping between megaloom state dicts and Hugging Face GPT-2 / Llama state dicts.

Owns parameter names and layouts only (no files, no configs beyond `ModelConfig`):

- GPT-2 stores its projections as `Conv1D` (weight shape (in, out), the transpose of a Linear)
  and fuses attention as `c_attn` = [q | k | v]; Llama has separate `q/k/v/o_proj` and
  `gate/up/down_proj`. megaloom fuses q, k, v into one `qkv` Linear whose rows are grouped per
  kv head: for each group, its query heads, then its key head, then its value head.
- Both use rotate-half RoPE (Llama) so q/k rows need no permutation.
- megaloom's embedding and head have `padded_vocab_size` rows: import appends zero rows,
  export drops them.

Every direction is a name table of (megaloom name, HF name, transposed) plus the qkv fuse/split;
import checks that every HF tensor is used exactly once and has the expected shape.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from megaloom.config import ModelConfig
from megaloom.errors import CheckpointError
from megaloom.model.registry import family_of

Pair = tuple[str, str, bool]  # (megaloom name, Hugging Face name, stored transposed in HF)

# Buffers some HF checkpoints carry that hold no learned state.
IGNORED_HF_TENSORS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")
HF_PREFIX = {"gpt2": "transformer.", "llama": "model."}
TOP_LEVEL = ("lm_head.weight", "score.weight")  # outside the base model
VOCAB_ROWS = ("embed.weight", "lm_head.weight", "lm_head.bias")  # padded to padded_vocab_size


def family_adapter(config: ModelConfig):
    """The family's own tensor mapping module (`registry.Family.hf_adapter`: names, prefix,
    ignored and aliased tensors), or None for the decoders, whose tables live here."""
    name = family_of(config).hf_adapter
    return importlib.import_module(name) if name else None


def _layer_pairs(config: ModelConfig, i: int) -> list[Pair]:
    ours = f"layers.{i}."
    if config.arch == "gpt2":
        hf = f"transformer.h.{i}."
        pairs = [
            ("attn_norm", "ln_1", False), ("attn.proj", "attn.c_proj", True),
            ("mlp_norm", "ln_2", False), ("mlp.up", "mlp.c_fc", True),
            ("mlp.down", "mlp.c_proj", True),
        ]
        return [(f"{ours}{a}.{kind}", f"{hf}{b}.{kind}", t and kind == "weight")
                for a, b, t in pairs for kind in ("weight", "bias")]
    hf = f"model.layers.{i}."
    pairs = [
        ("attn_norm", "input_layernorm"), ("attn.proj", "self_attn.o_proj"),
        ("mlp_norm", "post_attention_layernorm"), ("mlp.gate", "mlp.gate_proj"),
        ("mlp.up", "mlp.up_proj"), ("mlp.down", "mlp.down_proj"),
    ]
    return [(f"{ours}{a}.weight", f"{hf}{b}.weight", False) for a, b in pairs]


def _top_pairs(config: ModelConfig) -> list[Pair]:
    adapter = family_adapter(config)
    if adapter:
        return adapter.top_pairs(config)
    if config.arch == "gpt2":
        pairs = [("embed.weight", "transformer.wte.weight", False),
                 ("pos_embed.weight", "transformer.wpe.weight", False),
                 ("final_norm.weight", "transformer.ln_f.weight", False),
                 ("final_norm.bias", "transformer.ln_f.bias", False)]
    else:
        pairs = [("embed.weight", "model.embed_tokens.weight", False),
                 ("final_norm.weight", "model.norm.weight", False)]
    if config.num_labels:
        pairs.append(("lm_head.weight", "score.weight", False))
    elif not config.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight", False))
    return pairs


def _all_pairs(config: ModelConfig) -> list[Pair]:
    """Every one-to-one tensor (all but the fused qkv)."""
    adapter = family_adapter(config)
    if adapter:
        return adapter.all_pairs(config)
    return _top_pairs(config) + [p for i in range(config.num_layers)
                                 for p in _layer_pairs(config, i)]


def _qkv_layers(config: ModelConfig) -> list[tuple[str, int]]:
    """(stack, index) of every layer with a fused self-attention `qkv`: `layers`, and T5's
    `decoder_layers`."""
    return ([("layers", i) for i in range(config.num_layers)]
            + [("decoder_layers", i) for i in range(config.decoder_layers or 0)])


def _qkv_hf_names(config: ModelConfig, i: int, kind: str, stack: str = "layers") -> list[str]:
    adapter = family_adapter(config)
    if adapter:
        return adapter.qkv_hf_names(config, i, kind, stack)
    if config.arch == "gpt2":
        return [f"transformer.h.{i}.attn.c_attn.{kind}"]
    return [f"model.layers.{i}.self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: ModelConfig
             ) -> torch.Tensor:
    """Separate q (heads*d, ...), k and v (kv_heads*d, ...) -> megaloom's grouped `qkv` rows."""
    groups, d = config.num_kv_heads, config.head_dim
    rest = q.shape[1:]
    q = q.reshape(groups, (config.num_heads // groups) * d, *rest)
    return torch.cat([q, k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)], dim=1
                     ).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, config: ModelConfig
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`: megaloom's grouped rows -> (q, k, v) with heads in order."""
    groups, d = config.num_kv_heads, config.head_dim
    rest = qkv.shape[1:]
    q_rows = (config.num_heads // groups) * d
    q, k, v = qkv.reshape(groups, q_rows + 2 * d, *rest).split([q_rows, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _qkv_kinds(config: ModelConfig) -> tuple[str, ...]:
    return ("weight", "bias") if config.bias else ("weight",)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def normalize_hf_names(names: Iterable[str], config: ModelConfig) -> dict[str, str]:
    """HF name as megaloom expects it -> name in the checkpoint: adds the `transformer.` /
    `model.` prefix that base-model checkpoints (`GPT2Model`, `LlamaModel`) lack, and drops
    stateless buffers."""
    names = list(names)
    adapter = family_adapter(config)
    ignored = adapter.ignored(config) if adapter else ()
    top_level = TOP_LEVEL + (adapter.TOP_LEVEL if adapter else ())
    prefix = adapter.PREFIX if adapter else HF_PREFIX[config.arch]
    bare = not any(name.startswith(prefix) for name in names)
    return {(prefix + name if bare and not name.startswith(top_level) else name): name
            for name in names
            if not IGNORED_HF_TENSORS.search(name) and (prefix + name if bare else name)
            not in ignored}


def hf_sources(name: str, config: ModelConfig) -> list[str]:
    """The HF tensors (normalized names) megaloom parameter `name` is made from."""
    match = re.fullmatch(r"((?:decoder_)?layers)\.(\d+)\.attn\.qkv\.(weight|bias)", name)
    if match:
        return _qkv_hf_names(config, int(match.group(2)), match.group(3), match.group(1))
    pairs = {ours: theirs for ours, theirs, _ in _all_pairs(config)}
    if name not in pairs:
        raise CheckpointError(f"megaloom parameter {name!r} has no Hugging Face counterpart")
    return [pairs[name]]


def convert_hf_tensor(name: str, fetch: Callable[[str], torch.Tensor], config: ModelConfig,
                      shape: tuple[int, ...]) -> torch.Tensor:
    """Megaloom parameter `name` (of `shape`) from the HF tensors `fetch(hf_name)` returns:
    transposed Conv1D weights, fused grouped qkv, zero padding rows for the vocabulary."""
    names = hf_sources(name, config)
    parts = [fetch(n) for n in names]
    if name.endswith((".qkv.weight", ".qkv.bias")):
        kind = name.rsplit(".", 1)[1]
        try:
            if config.arch == "gpt2":
                fused = parts[0].t() if kind == "weight" else parts[0]
                d = config.head_dim
                parts = list(fused.split([config.num_heads * d, config.num_kv_heads * d,
                                          config.num_kv_heads * d]))
            tensor = fuse_qkv(*parts, config)
        except RuntimeError as exc:
            raise CheckpointError(f"{', '.join(names)}: unexpected shapes "
                                  f"{[tuple(p.shape) for p in parts]}") from exc
    else:
        transposed = next(t for ours, _, t in _all_pairs(config) if ours == name)
        tensor = parts[0].t() if transposed else parts[0]
        if (name in VOCAB_ROWS and not (config.num_labels and name.startswith("lm_head."))
                and tensor.shape[0] == config.vocab_size):
            tensor = _pad_rows(tensor, config.padded_vocab_size)
    if tuple(tensor.shape) != tuple(shape):
        raise CheckpointError(f"{', '.join(names)}: shape {tuple(tensor.shape)} does not match "
                              f"config.json (megaloom {name} expects {tuple(shape)})")
    return tensor


def hf_to_megaloom(hf: Mapping[str, torch.Tensor], config: ModelConfig,
                   expected_shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """A megaloom state dict from a HF one. `expected_shapes` (megaloom name -> shape) comes
    from the target model (a tied `lm_head.weight` left out or not); every HF tensor must be
    used and every shape must match."""
    original = normalize_hf_names(hf, config)
    adapter = family_adapter(config)
    head_name = adapter.TIED_HEAD if adapter else "lm_head.weight"
    if config.tied_head and head_name in original:
        head = hf[original.pop(head_name)]
        embed_name = _top_pairs(config)[0][1]
        if embed_name in original and not torch.equal(head, hf[original[embed_name]]):
            raise CheckpointError(f"tie_word_embeddings is true but {head_name} differs from "
                                  f"{embed_name}; set tie_word_embeddings=false in config.json")
    wanted = {n: s for n, s in expected_shapes.items()
              if not (config.tied_head and n == "lm_head.weight")}
    used = {hf_name for name in wanted for hf_name in hf_sources(name, config)}
    missing = sorted(used - set(original))
    if missing:
        raise CheckpointError(f"Hugging Face checkpoint lacks tensor {missing[0]!r}")
    unused = sorted(set(original) - used)
    if unused:
        raise CheckpointError(f"Hugging Face checkpoint has tensors megaloom does not use: "
                              f"{', '.join(unused[:5])}")
    return {name: convert_hf_tensor(name, lambda n: hf[original[n]], config, shape)
            for name, shape in wanted.items()}


def megaloom_to_hf(state: Mapping[str, torch.Tensor], config: ModelConfig
                   ) -> dict[str, torch.Tensor]:
    """A HF state dict (names as `save_pretrained` writes them) from a megaloom state dict.
    Padding vocabulary rows are dropped; a tied head is omitted, as HF does."""
    return dict(iter_megaloom_to_hf(state, config))


def iter_megaloom_to_hf(state: Mapping[str, torch.Tensor], config: ModelConfig
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """`megaloom_to_hf` one HF tensor at a time, reading each megaloom tensor when it is
    needed, so a lazy `state` (`checkpoint.LazyState`) converts in bounded memory."""
    adapter = family_adapter(config)
    aliases = dict(adapter.export_aliases(config)) if adapter else {}
    for ours, theirs, transposed in _all_pairs(config):
        tensor = state[ours]
        if ours in VOCAB_ROWS and not (config.num_labels and ours.startswith("lm_head.")):
            tensor = tensor[: config.vocab_size]
        yield theirs, (tensor.t() if transposed else tensor)
        yield from ((alias, tensor) for alias, source in aliases.items() if source == theirs)
    for stack, i in _qkv_layers(config):
        for kind in _qkv_kinds(config):
            q, k, v = split_qkv(state[f"{stack}.{i}.attn.qkv.{kind}"], config)
            names = _qkv_hf_names(config, i, kind, stack)
            if config.arch == "gpt2":
                fused = torch.cat([q, k, v])
                yield names[0], (fused.t() if kind == "weight" else fused)
            else:
                yield from zip(names, (q, k, v), strict=True)
