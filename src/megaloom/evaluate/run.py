"""One `megaloom evaluate` run: load the model once (one process, or this rank's
tensor-parallel shard), then hand it to the task's module.

Everything that can be checked without the model (flags, the data file) is checked before it
loads; the rest (window lengths against `seq_len`, classifier vs language model) right after.
`classify` on a language model is zero-shot classification by label words (`label_words`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from megaloom.config import Config
from megaloom.errors import DataError, MegaloomError
from megaloom.evaluate import classify, generation, label_words, loglikelihood, perplexity
from megaloom.evaluate.scoring import Scorer
from megaloom.tasks.records import BadRecords, read_records


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad flags and a missing data file before anything loads."""
    if not Path(args.data).is_file():
        raise DataError(f"data file not found: {args.data}")
    if args.batch_size < 1:
        raise MegaloomError("--batch-size must be >= 1")
    if args.bootstrap < 0:
        raise MegaloomError("--bootstrap must be >= 0")
    if args.task != "perplexity" and Path(args.data).suffix.lower() == ".txt":
        raise DataError(f"--task {args.task} reads JSONL records, not a .txt file")
    if args.max_length is not None and args.stride is not None:
        perplexity.check_lengths(args.max_length, args.stride, args.max_length)
    if args.prompt is not None:
        label_words.check_prompt(args.prompt)
    if args.label_words is not None:
        label_words.parse_label_words(args.label_words)
    if args.task == "generate":
        from megaloom.commands.generate import sampling_params

        sampling_params(args).validate()


@dataclass
class Evaluation:
    model: torch.nn.Module
    config: Config
    tokenizer: object
    device: torch.device
    topo: object | None  # the tensor-parallel topology under torchrun

    @property
    def leader(self) -> bool:
        return self.topo is None or self.topo.rank == 0

    @classmethod
    def load(cls, args: argparse.Namespace) -> Evaluation:
        from megaloom.data.tokenizer import Tokenizer
        from megaloom.loading import load_for_inference
        from megaloom.model.registry import family_of

        model, config, tokenizer_path, topo = load_for_inference(args.model, args.device)
        device = next(model.parameters()).device
        if config.model.num_labels and args.task != "classify":
            raise MegaloomError(f"{args.model} is a classifier; --task {args.task} needs a "
                                "language model")
        if not (config.model.num_labels and args.task == "classify"):
            family_of(config.model).require_generation(f"megaloom evaluate --task {args.task}")
        if config.model.num_labels and (args.prompt or args.label_words):
            raise MegaloomError(f"{args.model} is a classifier: it predicts with its head, "
                                "and --prompt/--label-words are for language models")
        return cls(model, config, Tokenizer.from_file(tokenizer_path), device, topo)

    def run(self, args: argparse.Namespace, sinks: list) -> dict | None:
        """The task's report on the leader rank; None on the others."""
        bad = BadRecords(args.skip_bad)
        if args.task == "generate":
            report = self._generate(args, sinks, bad)
        else:
            report = self._score(args, bad)
        if report is not None and args.skip_bad:
            report["skipped"] = len(bad.messages)
            report["skipped_lines"] = bad.messages[:100]
        return report if self.leader else None

    def _score(self, args: argparse.Namespace, bad: BadRecords) -> dict:
        seq_len = self.config.model.seq_len
        if args.task == "classify" and self.config.model.num_labels:
            records = read_records(args.data, bad)
            return classify.classify(self.model, self.tokenizer, self.config.task.labels,
                                     records, seq_len, args.batch_size, self.device, bad,
                                     self.leader)
        scorer = Scorer(self.model, self.config.model.vocab_size, seq_len + 1,
                        args.batch_size, self.device, progress=self.leader)
        if args.task == "perplexity":
            max_length = args.max_length or seq_len
            stride = args.stride or max(1, max_length // 2)
            perplexity.check_lengths(max_length, stride, seq_len)
            documents = perplexity.read_documents(args.data, args.field, bad)
            return perplexity.perplexity(scorer, self.tokenizer, documents, args.protocol,
                                         max_length, stride, bad)
        encoder = loglikelihood.PairEncoder(self.tokenizer, seq_len + 1, args.truncate)
        records = read_records(args.data, bad)
        if args.task == "lambada":
            return loglikelihood.lambada(scorer, encoder, records, args.field, bad)
        if args.task == "classify":
            words = label_words.parse_label_words(args.label_words) if args.label_words else None
            return label_words.classify(scorer, encoder, records,
                                        args.prompt or label_words.DEFAULT_PROMPT, words, bad)
        return loglikelihood.choice(scorer, encoder, records, bad)

    def _generate(self, args: argparse.Namespace, sinks: list, bad: BadRecords) -> dict | None:
        from megaloom.commands.generate import sampling_params
        from megaloom.infer import Engine
        from megaloom.infer.tensor_parallel import TensorParallelEngine, drive

        if self.topo is None:
            engine = Engine(self.model, self.tokenizer, args.batch_size)
        else:
            engine = TensorParallelEngine(self.model, self.topo, self.tokenizer,
                                          args.batch_size)
        options = generation.RougeOptions(stem=not args.no_stem, tokenizer=args.rouge_tokenizer,
                                          bootstrap=args.bootstrap, seed=args.bootstrap_seed,
                                          bleu=args.bleu)
        records = read_records(args.data, bad) if self.leader else []
        return drive(engine, lambda: generation.generate(
            engine, self.tokenizer, args.model, records, sampling_params(args), options,
            sinks, bad))
