"""Hugging Face GPT-2 / Llama checkpoints in and out of megaloom, without `transformers`.

Public entry points:

- `load_hf_model(hf_dir, device)` -> (GPT, Config, tokenizer path or None): what
  `megaloom.loading.load_model("hf:DIR")` calls, so `generate hf:DIR` and
  `train ... model.init_from=hf:DIR` use a HF directory directly.
- `export_hf(model, config, out_dir, ...)`: a directory `AutoModelForCausalLM.from_pretrained`
  and `AutoTokenizer.from_pretrained` load.
- `import_hf(hf_dir, out_dir)`: a megaloom checkpoint directory (`load_model` reads it) with
  the HF tokenizer side files kept, so exporting it again restores them.

The pieces live beside this file: `hf_config` (config.json mapping and refusals), `weights`
(tensor names and layouts), `weight_files` (single or sharded safetensors and .bin files),
`tokenizer_files`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from megaloom.config import Config, ModelConfig, TaskConfig
from megaloom.errors import CheckpointError
from megaloom.interop.hf_config import (
    hf_config_from_model,
    hf_labels,
    model_config_from_hf,
    read_hf_config,
)
from megaloom.interop.tokenizer_files import copy_side_files, find_tokenizer, write_tokenizer_files
from megaloom.interop.weight_files import (
    DEFAULT_MAX_SHARD_SIZE,
    open_hf_weights,
    read_hf_weights,
    write_hf_weights,
)
from megaloom.interop.weights import (
    convert_hf_tensor,
    hf_to_megaloom,
    iter_megaloom_to_hf,
    normalize_hf_names,
)
from megaloom.model.gpt import GPT
from megaloom.model.registry import build_model, family_of
from megaloom.utils.io import atomic_dir

log = logging.getLogger(__name__)


def load_hf_model(
    hf_dir: str | Path, device: str | torch.device = "cpu", *, dtype: torch.dtype = torch.float32
) -> tuple[GPT, Config, Path | None]:
    """Build a megaloom `GPT` from a HF GPT-2/Llama directory (config.json + weights).

    Weights are cast to `dtype` (fp32 master weights by default); the embedding and head get
    zero padding rows up to `padded_vocab_size`. Returns the model, a default `Config` around
    the imported `ModelConfig`, and the directory's `tokenizer.json` when it has one.
    """
    hf_dir = Path(hf_dir)
    config, tokenizer = hf_model_config(hf_dir)
    model_config = config.model
    with torch.device("meta"):
        model = build_model(model_config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    hf_state = read_hf_weights(hf_dir)
    try:
        state = hf_to_megaloom(hf_state, model_config, expected)
    except CheckpointError as exc:
        raise CheckpointError(f"{hf_dir}: {exc}") from exc
    state = {name: t.to(device=device, dtype=dtype).contiguous() for name, t in state.items()}
    if model_config.tied_head:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if model_config.tied_head:
        model.lm_head.weight = model.embed.weight
    log.info("loaded %s model (%.2fM parameters) from %s", model_config.arch,
             model.num_parameters() / 1e6, hf_dir)
    if tokenizer is None:
        log.warning("%s has no tokenizer.json, so no tokenizer comes with the model (save a fast "
                    "tokenizer there: AutoTokenizer.from_pretrained(...).save_pretrained(DIR))",
                    hf_dir)
    return model, config, tokenizer


class HFSource:
    """A `TensorSource` over a Hugging Face directory: each megaloom parameter is converted
    from its HF tensors when asked for (safetensors read tensor by tensor), and only the box
    a rank owns is kept, so building a shard peaks at the shard plus one parameter."""

    def __init__(self, hf_dir: str | Path, config: ModelConfig):
        self.config = config
        self.weights = open_hf_weights(hf_dir)
        self.names = normalize_hf_names(self.weights, config)

    def read(self, name: str, shape: tuple[int, ...], box) -> torch.Tensor:
        def fetch(hf_name: str) -> torch.Tensor:
            if hf_name not in self.names:
                raise CheckpointError(f"Hugging Face checkpoint lacks tensor {hf_name!r}")
            return self.weights[self.names[hf_name]]

        full = convert_hf_tensor(name, fetch, self.config, shape).float()
        return full[tuple(slice(lo, hi) for lo, hi in box)].clone()


def hf_model_config(hf_dir: str | Path) -> tuple[Config, Path | None]:
    """The `Config` around a HF directory's model and its tokenizer, without the weights."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"Hugging Face model directory not found: {hf_dir}")
    hf = read_hf_config(hf_dir)
    model_config = model_config_from_hf(hf, source=str(hf_dir / "config.json"))
    task = (TaskConfig(name="classify", labels=hf_labels(hf)) if model_config.num_labels
            else TaskConfig(name=family_of(model_config).tasks[0]))  # its pretraining task
    return Config(model=model_config, task=task).validate(), find_tokenizer(hf_dir)


def export_hf(
    model: GPT | Mapping[str, torch.Tensor],
    config: Config | ModelConfig,
    out_dir: str | Path,
    tokenizer_path: str | Path | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` (a `GPT`, or a state mapping such as a checkpoint's lazy
    `train.checkpoint.LazyState`) as a HF GPT-2 (`arch=gpt2`) or Llama (`arch=llama`) directory.

    Tensors are converted and written one file at a time, so a lazy state streams in memory
    bounded by `max_shard_size`. Padding vocabulary rows are dropped, a tied head is stored
    once, weights are cast to `dtype` when given, and files above `max_shard_size` (bytes or
    "5GB") are sharded with an index. `out_dir` must not exist or be empty; it appears
    complete or not at all.
    """
    model_config = config.model if isinstance(config, Config) else config
    out_dir = _empty_output(out_dir)
    if isinstance(model, nn.Module):
        state = {k: v.detach() for k, v in model.state_dict().items()}
        weights_dtype = dtype or next(model.parameters()).dtype
    else:
        state, weights_dtype = model, dtype or getattr(model, "dtype", torch.float32)
    hf_config_from_model(model_config, weights_dtype)  # refuse before touching anything
    shapes = getattr(state, "shapes", None) or {k: v.shape for k, v in state.items()}
    meta_state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    sizes = {name: t.numel() * weights_dtype.itemsize  # planned from shapes, nothing read
             for name, t in iter_megaloom_to_hf(meta_state, model_config)}
    tensors = ((name, t.to(weights_dtype)) for name, t in iter_megaloom_to_hf(state, model_config))
    with atomic_dir(out_dir) as tmp:
        token_ids = {}
        if tokenizer_path is not None:
            token_ids = write_tokenizer_files(tokenizer_path, tmp, model_config.seq_len)
        labels = config.task.labels if isinstance(config, Config) else None
        hf_config = hf_config_from_model(model_config, weights_dtype, labels=labels,
                                         **token_ids)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n",
                                         encoding="utf-8")
        write_hf_weights(tensors, tmp, max_shard_size, sizes=sizes)
    log.info("exported %s model to %s", model_config.arch, out_dir)
    return out_dir


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a HF directory into a megaloom checkpoint directory (weights-only)."""
    from megaloom.checkpoint.files import write_manifest, write_model_files

    out_dir = _empty_output(out_dir)
    model, config, tokenizer_path = load_hf_model(hf_dir)
    with atomic_dir(out_dir) as tmp:
        write_model_files(tmp, model, config, tokenizer_path)
        if tokenizer_path is not None:
            copy_side_files(Path(hf_dir), tmp)
        write_manifest(tmp)
    log.info("wrote megaloom checkpoint %s", out_dir)
    return out_dir


def _empty_output(out_dir: str | Path) -> Path:
    """`out_dir` as a Path; refuses one that exists and holds anything (never overwrite data)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"output directory {out_dir} exists and is not empty")
    return out_dir
