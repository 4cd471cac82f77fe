"""Loading a model for use: the one layer every command goes through (`generate`, `serve`,
`evaluate`, `convert`, `finetune`, `model.init_from`, tensor-parallel inference).

A model spec is a run directory, a `checkpoints/` directory, a step directory, or `hf:DIR`
for a Hugging Face GPT-2/Llama directory. Below this module lie the checkpoint files
(`megaloom.checkpoint`) and the Hugging Face converters (`megaloom.interop`), which never
import it back.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from megaloom.checkpoint.reader import open_checkpoint
from megaloom.config import Config, LoraConfig
from megaloom.errors import MegaloomError
from megaloom.model.gpt import GPT

log = logging.getLogger(__name__)


def open_weights(spec: str | Path) -> tuple[Config, Path | None, object]:
    """(config, tokenizer path, `TensorSource` of the weights) of a model spec; a megaloom
    checkpoint is read box by box (each rank reads only its slices, LoRA adapters merged in),
    a Hugging Face directory parameter by parameter."""
    text = str(spec)
    if text.startswith("hf:"):
        from megaloom.interop.hf import HFSource, hf_model_config

        config, tokenizer = hf_model_config(text[3:])
        return config, (Path(tokenizer) if tokenizer else None), HFSource(text[3:],
                                                                          config.model)
    from megaloom.compress.quantize import refuse_quantized
    from megaloom.finetune.lora import merged_source

    checkpoint = open_checkpoint(spec)
    refuse_quantized(checkpoint.directory, "training or conversion")
    return checkpoint.config, checkpoint.tokenizer, merged_source(checkpoint, checkpoint.config)


def load_model(spec: str | Path, device: str | torch.device = "cpu",
               ) -> tuple[GPT, Config, Path | None]:
    """The whole model of `spec` in one process, for inference or export.
    Returns (model in eval mode, config, tokenizer path)."""
    from megaloom.parallel.topology import Topology

    text = str(spec)
    if text.startswith("hf:"):
        from megaloom.interop.hf import load_hf_model

        model, config, tokenizer = load_hf_model(text[3:], device=device)
        return model.eval(), config, (Path(tokenizer) if tokenizer else None)
    model, config, tokenizer = load_shard(spec, Topology.build(device=torch.device(device),
                                                                virtual=(1, 0)))
    return model.eval(), config, tokenizer


def load_shard(spec: str | Path, topo, dropout_seed: int | None = None):
    """This rank's shard on `topo` of the weights of `spec`, float or quantised (`megaloom
    quantize`), each rank reading only its boxes; a tp model with dropout gets its RNG
    streams seeded by `dropout_seed`. Returns (model, config, tokenizer path); the config of
    a LoRA run describes the merged weights returned."""
    from megaloom.parallel.build import build_shard
    from megaloom.parallel.random import seed_everything

    quantized = quantization_of(spec)
    if quantized is not None:
        from megaloom.compress.quantize import load_quantized_shard

        return load_quantized_shard(*quantized, topo)
    config, tokenizer, source = open_weights(spec)
    if config.task.lora.rank:
        config = dataclasses.replace(config, task=dataclasses.replace(config.task,
                                                                      lora=LoraConfig()))
    tracker = (seed_everything(dropout_seed, topo) if dropout_seed is not None
               and config.model.dropout > 0 and topo.tp > 1 else None)
    return build_shard(config.model, topo, source, tracker=tracker), config, tokenizer


def quantization_of(spec: str | Path):
    """(directory, `QuantSpec`, quantised module names) when `spec` names a quantised
    checkpoint (`megaloom quantize`), else None."""
    if str(spec).startswith("hf:"):
        return None
    from megaloom.checkpoint.reader import resolve_checkpoint
    from megaloom.compress.quantize import read_spec

    directory = resolve_checkpoint(spec)
    found = read_spec(directory)
    return None if found is None else (directory, *found)


def require_tokenizer(spec: str | Path, tokenizer_path: Path | None) -> Path:
    """The tokenizer that came with the weights of `spec`; an error when there is none."""
    if tokenizer_path is None:
        raise MegaloomError(f"{spec}: no tokenizer found beside the weights (a megaloom "
                            "checkpoint keeps tokenizer.json; a Hugging Face directory needs "
                            "a fast tokenizer's tokenizer.json)")
    return tokenizer_path


def load_for_inference(spec: str | Path, device_name: str):
    """The model of `spec` on `device_name` (`auto`, `cpu`, ...), split over the torchrun
    job's ranks when launched under one (tensor parallel), else whole.

    Returns (model, config, tokenizer path, topology or None for one process)."""
    from megaloom.utils.device import resolve_device
    from megaloom.utils.launch import under_torchrun

    device = resolve_device(device_name)
    log.info("loading %s on %s", spec, device)
    if under_torchrun():
        from megaloom.infer.tensor_parallel import load_tensor_parallel

        model, config, tokenizer, topo = load_tensor_parallel(spec, device)
        return model, config, require_tokenizer(spec, tokenizer), topo
    model, config, tokenizer = load_model(spec, device=device)
    return model, config, require_tokenizer(spec, tokenizer), None


def load_engine(spec: str | Path, device_name: str, max_batch_size: int):
    """An inference engine over `load_for_inference(spec, device_name)` with its tokenizer:
    a `TensorParallelEngine` on every rank under torchrun, else an `Engine`.
    Returns (engine, tokenizer path)."""
    from megaloom.data.tokenizer import Tokenizer
    from megaloom.infer import Engine
    from megaloom.infer.tensor_parallel import TensorParallelEngine

    model, _, tokenizer_path, topo = load_for_inference(spec, device_name)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    if topo is not None:
        return TensorParallelEngine(model, topo, tokenizer, max_batch_size), tokenizer_path
    return Engine(model, tokenizer, max_batch_size), tokenizer_path
