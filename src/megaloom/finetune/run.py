"""Set up a fine-tuning run: the base model's weights and tokenizer, the task's data, the
classifier head and LoRA adapters, then the same `Trainer` pretraining uses.

`prepare_finetune(base, train_file, valid_file)` returns the `prepare` step of
`megaloom.train.run.build_trainer`: the base (a megaloom run or `hf:DIR`) fixes the model's
shape and tokenizer; `task.name` picks SFT or classification; a classifier's label set comes
from the training file and is saved with the run (`task.labels`, `model.num_labels`), and its
new head is drawn from the layout-independent initialisation while every other weight is read
from the base, box by box, on each rank.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from functools import partial
from pathlib import Path

import torch

from megaloom.config import Config, ConfigError, ModelConfig
from megaloom.data.tokenizer import Tokenizer
from megaloom.errors import DataError, MegaloomError
from megaloom.finetune.lora import apply_lora
from megaloom.loading import open_weights, require_tokenizer
from megaloom.model.init import Box
from megaloom.model.registry import build_model
from megaloom.parallel.build import InitSource, TensorSource
from megaloom.tasks import EpochShuffled
from megaloom.tasks.classify import ClassifyTask, Framing, load_classify_data, read_label_set
from megaloom.tasks.sft import SFTTask, load_sft_data
from megaloom.tasks.text_to_text import TextToTextTask
from megaloom.train.run import Prepared

log = logging.getLogger(__name__)
HEAD = ("lm_head.weight", "lm_head.bias")


def new_parameters(base: ModelConfig, classifier: ModelConfig) -> set[str]:
    """Parameters of `classifier` that a language model `base` has no values for: the head,
    and what the classifier adds (BERT's pooler)."""
    with torch.device("meta"):
        before, after = (set(build_model(c).state_dict()) for c in (base, classifier))
    return (after - before) | (set(HEAD) & after)


class NewHeadSource:
    """The base's weights, except the `fresh` parameters of a new classifier head."""

    def __init__(self, base: TensorSource, fresh: TensorSource, fresh_names: set[str]):
        self.base, self.fresh, self.fresh_names = base, fresh, fresh_names

    def read(self, name: str, shape: tuple[int, ...], box: Box) -> torch.Tensor:
        return (self.fresh if name in self.fresh_names else self.base).read(name, shape, box)


class FinetunePreparation:
    """The `prepare` callable for `build_trainer` of a fine-tuning run from `base`; after the
    call, `train` and `valid` hold the task's data (`SFTData` / `ClassifyData`)."""

    def __init__(self, base: str, train_file: str | Path, valid_file: str | Path | None):
        self.base, self.train_file, self.valid_file = base, train_file, valid_file
        self.train = self.valid = None

    def __call__(self, config: Config) -> Prepared:
        base, train_file, valid_file = self.base, self.train_file, self.valid_file
        task_cfg = config.task
        if task_cfg.name not in ("sft", "classify"):
            raise ConfigError(f"task.name={task_cfg.name!r}: megaloom finetune trains "
                              "task.name=sft or classify (pretrain with megaloom train)")
        loaded, tokenizer_path, source = open_weights(base)
        tokenizer_path = require_tokenizer(base, tokenizer_path)
        if loaded.model.num_labels and task_cfg.name == "sft":
            raise MegaloomError(f"{base} is a sequence classifier; SFT needs a language model")
        tokenizer = Tokenizer.from_file(tokenizer_path)
        config.data.tokenizer = str(tokenizer_path)
        config.model = dataclasses.replace(loaded.model, init_from=base,
                                           dropout=config.model.dropout)
        seq_len = config.model.seq_len
        if task_cfg.name == "sft":
            config.model.num_labels = 0
            decoder_len = config.model.decoder_seq_len  # an encoder-decoder's target rows
            train, valid = (None if file is None else load_sft_data(
                file, task_cfg, tokenizer, tokenizer_path, seq_len, decoder_len)
                for file in (train_file, valid_file))
            task = (SFTTask(config.model.vocab_size, task_cfg.pack) if decoder_len is None
                    else TextToTextTask(config.model.vocab_size, config.model.decoder_start_id))
        else:
            labels = task_cfg.labels or read_label_set(train_file, task_cfg)
            task_cfg.labels = labels
            if len(task_cfg.class_weights) not in (0, len(labels)):
                raise ConfigError(f"task.class_weights: {len(task_cfg.class_weights)} weights "
                                  f"for {len(labels)} labels ({', '.join(labels)})")
            if loaded.model.num_labels not in (0, len(labels)):
                raise MegaloomError(f"{base} is a classifier with {loaded.model.num_labels} "
                                    f"labels, the data has {len(labels)}")
            fresh_head = loaded.model.num_labels == 0
            config.model.num_labels = len(labels)
            framing = Framing.for_model(config.model, tokenizer, task_cfg.mlm)
            train = load_classify_data(train_file, task_cfg, labels, tokenizer, seq_len, framing)
            valid = (load_classify_data(valid_file, task_cfg, labels, tokenizer, seq_len,
                                        framing) if valid_file else None)
            task = ClassifyTask(len(labels), task_cfg.class_weights)
            if fresh_head:
                source = NewHeadSource(source, InitSource(config.model, config.train.seed),
                                       new_parameters(loaded.model, config.model))
        self.train, self.valid = train, valid
        log.info("%s", train.describe("train"))
        if valid is not None:
            log.info("%s", valid.describe("valid"))
        if task_cfg.epochs is not None:
            config.train.max_steps = max(1, math.ceil(
                task_cfg.epochs * len(train.rows) / config.train.global_batch_size))
        config.validate()
        adapt = None
        if task_cfg.lora.rank:
            adapt = partial(_adapt, cfg=task_cfg.lora, seed=config.train.seed)
        return Prepared(source, EpochShuffled(train.rows, config.train.seed),
                        valid.rows if valid is not None else None, task, adapt)


def _adapt(model, topo, tracker, cfg, seed) -> None:
    try:
        apply_lora(model, topo, cfg, seed, tracker)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def check_files(train_file: str | Path, valid_file: str | Path | None) -> None:
    """Both files exist (before any process is started)."""
    for path in (train_file, valid_file):
        if path is not None and not Path(path).is_file():
            raise DataError(f"data file not found: {path}")
