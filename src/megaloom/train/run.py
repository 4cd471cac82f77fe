"""Set up a training run from a `Config` on this rank: join the torchrun job, data (or the
embedded default corpus), tokenizer, model shard (fresh or `model.init_from`), resume, then
hand over to the `Trainer`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from megaloom.checkpoint.reader import find_latest
from megaloom.config import Config, ConfigError
from megaloom.errors import MegaloomError
from megaloom.loading import open_weights
from megaloom.parallel.build import TensorSource
from megaloom.parallel.topology import Topology, init_distributed
from megaloom.plan.params import count_parameters
from megaloom.tasks import Task
from megaloom.train.trainer import Trainer
from megaloom.utils.device import resolve_device
from megaloom.utils.launch import Launch

log = logging.getLogger(__name__)


def resolve_data(config: Config) -> int:
    """Fill `data.prefixes`/`data.tokenizer` (default corpus when no data is given); return
    the tokenizer's vocabulary size."""
    from megaloom.data.default_corpus import ensure_default_data
    from megaloom.data.masking import BERT_TOKENS, SENTINEL
    from megaloom.data.tokenizer import Tokenizer

    data = config.data
    if not data.prefixes:
        if data.tokenizer is not None:
            raise MegaloomError("data.tokenizer is set but data.prefixes is empty: preprocess "
                                "your text with that tokenizer and list the prefixes")
        extra = {"mlm": BERT_TOKENS,
                 "span": tuple(SENTINEL.format(i) for i in range(config.task.span.sentinels))
                 }.get(config.task.name, ())
        tokenizer_path, prefix = ensure_default_data(data.cache_dir,
                                                     vocab_size=config.model.vocab_size,
                                                     extra_tokens=extra)
        data.prefixes, data.tokenizer = [prefix], str(tokenizer_path)
        log.info("no data given: using the embedded default corpus (%s)", prefix)
    if data.tokenizer is None:
        raise MegaloomError("data.tokenizer is required with data.prefixes "
                            "(the tokenizer.json the data was preprocessed with)")
    return Tokenizer.from_file(data.tokenizer).vocab_size


def init_source(config: Config) -> TensorSource | None:
    """The weights `model.init_from` names, as a `TensorSource` each rank reads its boxes from
    (None: fresh weights); `config.model` becomes that checkpoint's shape."""
    source = config.model.init_from
    if source is None:
        return None
    loaded, tokenizer, reader = open_weights(source)
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
    return reader


def sample_counts(config: Config) -> tuple[int, int, int]:
    """Samples to index per split: every training step, the fixed validation batches, no test
    samples (training never reads the test split)."""
    train = config.train
    eval_samples = train.eval_iters * train.micro_batch_size
    return train.max_steps * train.global_batch_size, eval_samples, 0


@dataclass
class Prepared:
    """Everything a rank needs before its trainer is built: where the weights come from
    (None: fresh), the datasets, the task (None: language modelling) and a hook that changes
    the built shard (LoRA)."""

    source: TensorSource | None
    train: Sequence
    valid: Sequence | None
    task: Task | None = None
    adapt: Callable | None = None


def prepare_run(config: Config) -> Prepared:
    """Pretraining or distillation: data (index caches built on first use), tokenizer,
    `model.init_from` and, for `task.name=distill`, the teacher."""
    if config.task.name not in ("lm", "distill", "mlm", "span"):
        raise ConfigError(f"task.name={config.task.name!r}: megaloom train pretrains "
                          "(task.name=lm, mlm for BERT, span for T5) or distils "
                          "(task.name=distill); "
                          f"fine-tune with megaloom finetune --task {config.task.name}")
    from megaloom.data.gpt_dataset import build_gpt_datasets

    if config.model.init_from is None:
        config.model.vocab_size = resolve_data(config)
        source = None
    else:
        source = init_source(config)  # may name the tokenizer resolve_data needs
        vocab_size = resolve_data(config)
        if vocab_size > config.model.vocab_size:
            raise MegaloomError(
                f"the tokenizer {config.data.tokenizer} has {vocab_size} tokens but the "
                f"model.init_from model only {config.model.vocab_size}")
    config.validate()
    if config.task.name == "mlm":
        return prepare_masked_lm(config, source)
    if config.task.name == "span":
        return prepare_span_corruption(config, source)
    train_ds, valid_ds, _ = build_gpt_datasets(
        config.data, config.model.seq_len, config.train.seed, sample_counts(config)
    )
    if config.task.name == "lm":
        return Prepared(source, train_ds, valid_ds)
    from megaloom.tasks.distill import DistillTask

    task = DistillTask(config.model, config.task.distill,
                       config.parallel.sequence_parallel and config.parallel.tp > 1,
                       config.train.precision)
    return Prepared(source, train_ds, valid_ds, task, task.attach)


def cloze_datasets(config: Config, window: int, make: Callable) -> tuple:
    """Train and valid datasets of the encoder families: token windows of `window` tokens,
    each split's samples made by `make(windows, tokenizer, seed)` (a seed per split)."""
    from megaloom.data.gpt_dataset import build_gpt_datasets
    from megaloom.data.tokenizer import Tokenizer

    windows = build_gpt_datasets(config.data, window - 1, config.train.seed,
                                 sample_counts(config))
    tokenizer = Tokenizer.from_file(config.data.tokenizer)
    return tuple(None if ds is None else make(ds, tokenizer, config.train.seed * 3 + split)
                 for split, ds in enumerate(windows[:2]))


def prepare_masked_lm(config: Config, source: TensorSource | None) -> Prepared:
    """BERT pretraining: windows of `seq_len - 3` tokens framed and masked per sample."""
    from megaloom.tasks.mlm import FRAMING_TOKENS, MaskedLMDataset, MaskedLMTask

    window = config.model.seq_len - FRAMING_TOKENS
    if window < 2:
        raise ConfigError(f"model.seq_len={config.model.seq_len} is too short for masked-LM "
                          f"samples ([CLS] A [SEP] B [SEP] needs at least {FRAMING_TOKENS + 2})")
    train_ds, valid_ds = cloze_datasets(config, window, lambda ds, tokenizer, seed: (
        MaskedLMDataset(ds, tokenizer, config.task.mlm, seed, config.model.binary_head)))
    return Prepared(source, train_ds, valid_ds, MaskedLMTask(config.model.vocab_size))


def prepare_span_corruption(config: Config, source: TensorSource | None) -> Prepared:
    """T5 pretraining: windows sized so each corrupted input fills `model.seq_len`."""
    from megaloom.tasks.span import SpanCorruptionDataset, window_length
    from megaloom.tasks.text_to_text import TextToTextTask

    window = window_length(config.model.seq_len, config.task.span)
    train_ds, valid_ds = cloze_datasets(config, window, lambda ds, tokenizer, seed: (
        SpanCorruptionDataset(ds, tokenizer, config.task.span, seed, config.model.seq_len)))
    parallel = config.parallel
    multiple = parallel.tp if parallel.sequence_parallel else 1
    return Prepared(source, train_ds, valid_ds,
                    TextToTextTask(config.model.vocab_size, config.model.decoder_start_id,
                                   multiple))


def join_job(config: Config) -> Topology:
    """Join the torchrun job (if any) and build the layout's topology."""
    device = Launch.from_environment().device(resolve_device(config.train.device))
    init_distributed(device, timedelta(seconds=config.parallel.timeout_s))
    try:
        topo = Topology.build(config.parallel.tp, config.parallel.pp, device,
                              timeout=timedelta(seconds=config.parallel.timeout_s))
    except ValueError as exc:
        raise ConfigError(f"parallel.tp/parallel.pp: {exc} (start more processes with "
                          "`megaloom train --nproc N` or torchrun --nproc-per-node N)") from exc
    if topo.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    return topo


def build_trainer(config: Config, resume: bool = True,
                  prepare: Callable[[Config], Prepared] = prepare_run) -> Trainer:
    """Everything up to the first step, on this rank: join the job, `prepare` the run (rank 0
    first, then the first process of every other node, then the rest, so caches are built
    once per file system), build this rank's shard, and resume from `train.out_dir`'s newest
    checkpoint when there is one."""
    topo = join_job(config)
    turn = 0 if topo.rank == 0 else 1 if topo.local_rank == 0 else 2
    prepared = None
    for stage in range(3):
        if stage == turn:
            prepared = prepare(config)
        if topo.world_size > 1:
            dist.barrier(group=topo.patient_group)
    trainer = Trainer.create(config, prepared.train, prepared.valid, config.data.tokenizer, topo,
                             prepared.source, prepared.task, prepared.adapt)
    out_dir = Path(config.train.out_dir)
    latest = find_latest(out_dir) if out_dir.exists() else None
    if latest is not None:
        if not resume:
            raise MegaloomError(f"{out_dir} already holds checkpoints (latest {latest.name}); "
                                "resume, or choose another train.out_dir")
        trainer.resume(latest)
    if topo.rank == 0:
        config.save(out_dir / "config.yaml")
    log.info("model: %s flavour, %.2fM parameters; %d tokens/step; device %s; layout tp=%d "
             "pp=%d dp=%d%s%s", config.model.arch, count_parameters(config.model) / 1e6,
             config.train.global_batch_size * config.model.seq_len, topo.device, topo.tp,
             topo.pp, topo.dp, " sequence-parallel" if trainer.sequence_parallel else "",
             " distributed-optimizer" if config.parallel.distributed_optimizer else "")
    return trainer
