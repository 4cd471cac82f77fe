"""Set up a training run from a `Config`: data (or the embedded default corpus), tokenizer,
model (fresh or `model.init_from`), resume, then hand over to the `Trainer`."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from megaloom.config import Config
from megaloom.errors import MegaloomError
from megaloom.model.gpt import GPT
from megaloom.train import checkpoint as ckpt
from megaloom.train.trainer import Trainer
from megaloom.utils.device import resolve_device

log = logging.getLogger(__name__)


def resolve_data(config: Config) -> int:
    """Fill `data.prefixes`/`data.tokenizer` (default corpus when no data is given); return
    the tokenizer's vocabulary size."""
    from megaloom.data.default_corpus import ensure_default_data
    from megaloom.data.tokenizer import Tokenizer

    data = config.data
    if not data.prefixes:
        if data.tokenizer is not None:
            raise MegaloomError("data.tokenizer is set but data.prefixes is empty: preprocess "
                                "your text with that tokenizer and list the prefixes")
        tokenizer_path, prefix = ensure_default_data(data.cache_dir,
                                                     vocab_size=config.model.vocab_size)
        data.prefixes, data.tokenizer = [prefix], str(tokenizer_path)
        log.info("no data given: using the embedded default corpus (%s)", prefix)
    if data.tokenizer is None:
        raise MegaloomError("data.tokenizer is required with data.prefixes "
                            "(the tokenizer.json the data was preprocessed with)")
    return Tokenizer.from_file(data.tokenizer).vocab_size


def initial_model(config: Config) -> GPT:
    """A seeded fresh model, or the weights named by `model.init_from`."""
    source = config.model.init_from
    if source is None:
        torch.manual_seed(config.train.seed)
        return GPT(config.model)
    model, loaded, tokenizer = ckpt.load_model(source)
    dropout = config.model.dropout
    defaults = type(config.model)(arch=config.model.arch)
    ignored = [f"{f.name}={getattr(config.model, f.name)!r}"
               for f in dataclasses.fields(config.model)
               if f.name not in ("init_from", "dropout")
               and getattr(config.model, f.name) != getattr(defaults, f.name)
               and getattr(config.model, f.name) != getattr(loaded.model, f.name)]
    if ignored:
        log.warning("model.init_from=%s sets the model's shape; ignoring the recipe's %s",
                    source, ", ".join(ignored))
    config.model = dataclasses.replace(loaded.model, init_from=source, dropout=dropout)
    if config.data.tokenizer is None and tokenizer is not None:
        config.data.tokenizer = str(tokenizer)
    if not config.data.prefixes:
        raise MegaloomError("model.init_from needs data.prefixes preprocessed with that "
                            "model's tokenizer")
    fresh = GPT(config.model)
    fresh.load_state_dict(model.state_dict())
    return fresh


def sample_counts(config: Config) -> tuple[int, int, int]:
    """Samples to index per split: every training step, the fixed validation batches, no test
    samples (training never reads the test split)."""
    train = config.train
    eval_samples = train.eval_iters * train.micro_batch_size
    return train.max_steps * train.global_batch_size, eval_samples, 0


def build_trainer(config: Config, resume: bool = True) -> Trainer:
    """Everything up to the first step; resumes from `train.out_dir` when it has a checkpoint."""
    from megaloom.data.gpt_dataset import build_gpt_datasets

    out_dir = Path(config.train.out_dir)
    if config.model.init_from is None:
        config.model.vocab_size = resolve_data(config)
        model = initial_model(config)
    else:
        model = initial_model(config)  # may name the tokenizer resolve_data needs
        vocab_size = resolve_data(config)
        if vocab_size > config.model.vocab_size:
            raise MegaloomError(
                f"the tokenizer {config.data.tokenizer} has {vocab_size} tokens but the "
                f"model.init_from model only {config.model.vocab_size}")
    train_ds, valid_ds, _ = build_gpt_datasets(
        config.data, config.model.seq_len, config.train.seed, sample_counts(config)
    )
    device = resolve_device(config.train.device)
    trainer = Trainer(config, model, train_ds, valid_ds, config.data.tokenizer, device)
    latest = ckpt.find_latest(out_dir) if out_dir.exists() else None
    if latest is not None:
        if not resume:
            raise MegaloomError(f"{out_dir} already holds checkpoints (latest {latest.name}); "
                                "resume, or choose another train.out_dir")
        trainer.resume(latest)
    config.save(out_dir / "config.yaml")
    log.info("model: %s flavour, %.2fM parameters; %d tokens/step; device %s",
             config.model.arch, model.num_parameters() / 1e6,
             config.train.global_batch_size * config.model.seq_len, device)
    return trainer
