"""Sequence classification (sentiment, topic): text -> one of the labels seen in training.

A record is `text` + `label` (any string). The label set is the sorted set of training labels
(stored with the model as `task.labels`; `model.num_labels` sizes the head). Each row is the
text's tokens (cut to `seq_len`) padded with the end-of-text id; the model's head maps every
position to label scores and the loss pools the scores at each row's last real token (by
length, so pad == eos is harmless), as Hugging Face's `*ForSequenceClassification` do; a
BERT classifier reads `[CLS] text [SEP]` and pools the first token (`Framing`).
Cross-entropy, optionally with class weights, is normalised by the summed weight of the
rows (torch's weighted mean), so accumulation and dp never change it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megaloom.config import MaskedLMConfig, ModelConfig, TaskConfig
from megaloom.data.tokenizer import Tokenizer
from megaloom.errors import DataError
from megaloom.parallel.loss import vocab_parallel_cross_entropy
from megaloom.parallel.mappings import gather_last
from megaloom.parallel.topology import Axis
from megaloom.tasks.base import stack
from megaloom.tasks.records import read_records


@dataclass(frozen=True)
class Framing:
    """How a classifier reads a text: a decoder takes the ids and is pooled at the last real
    token; an encoder (BERT) takes `[CLS] ids [SEP]`, pools the first token itself and masks
    the padding out of its attention."""

    cls: int | None = None
    sep: int | None = None

    @classmethod
    def for_model(cls, config: ModelConfig, tokenizer: Tokenizer,
                  mlm: MaskedLMConfig | None = None) -> Framing:
        if config.arch != "bert":
            return cls()
        mlm = mlm or MaskedLMConfig()
        ids = [tokenizer.token_to_id(t) for t in (mlm.cls_token, mlm.sep_token)]
        if None in ids:
            missing = (mlm.cls_token, mlm.sep_token)[ids.index(None)]
            raise DataError(f"the tokenizer {tokenizer.source} has no {missing} token, which "
                            "a BERT classifier frames each text with (task.mlm.cls_token / "
                            "sep_token name them)")
        return cls(*ids)

    @property
    def encoder(self) -> bool:
        return self.cls is not None

    def frame(self, ids: list[int], seq_len: int) -> tuple[list[int], bool]:
        """(the model's input ids, whether the text was cut to fit `seq_len`)."""
        room = seq_len - 2 if self.encoder else seq_len
        cut = ids[:room]
        return ([self.cls, *cut, self.sep] if self.encoder else cut), len(ids) > room


@dataclass
class ClassifyData:
    rows: list[dict[str, np.ndarray]]
    texts: list[str]
    labels: list[int]
    truncated: int

    def describe(self, name: str) -> str:
        counts = np.bincount(self.labels)
        return (f"{name}: {len(self.rows)} texts, label counts {counts.tolist()}; "
                f"{self.truncated} truncated to model.seq_len")


def read_label_set(path: str | Path, cfg: TaskConfig) -> list[str]:
    """The sorted labels of the training file (at least two)."""
    labels = sorted({_label(r, cfg.label_field) for r in read_records(path)})
    if len(labels) < 2:
        raise DataError(f"{path}: field {cfg.label_field!r} has only one class "
                        f"({labels[0]!r}); a classifier needs at least two")
    return labels


def _label(record, key: str) -> str:
    if key not in record.fields:
        raise DataError(f"{record.where}: missing field {key!r}")
    value = record.fields[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{record.where}: field {key!r} must be a string or an integer")
    return str(value)


def load_classify_data(path: str | Path, cfg: TaskConfig, labels: Sequence[str],
                       tokenizer: Tokenizer, seq_len: int, framing: Framing = Framing()
                       ) -> ClassifyData:
    """Tokenised, framed, padded rows of `path`; a label outside `labels` is an error."""
    index = {label: i for i, label in enumerate(labels)}
    pad = framing.sep if framing.encoder else tokenizer.eod_id
    rows, texts, targets, truncated = [], [], [], 0
    for record in read_records(path):
        text = record.text(cfg.text_field)
        label = _label(record, cfg.label_field)
        if label not in index:
            raise DataError(f"{record.where}: label {label!r} never occurs in the training "
                            f"data (labels: {', '.join(labels)})")
        ids = tokenizer.encode(text)
        if not ids:
            raise DataError(f"{record.where}: the text encodes to no tokens")
        ids, cut = framing.frame(ids, seq_len)
        truncated += cut
        tokens = np.full(seq_len, pad, np.int64)
        tokens[:len(ids)] = ids
        row = {"tokens": tokens, "last": np.int64(len(ids) - 1), "label": np.int64(index[label])}
        if framing.encoder:
            row["attend"] = np.arange(seq_len) < len(ids)
        rows.append(row)
        texts.append(text)
        targets.append(index[label])
    return ClassifyData(rows, texts, targets, truncated)


class ClassifyTask:
    """Cross-entropy of the label scores pooled at each row's last real token."""

    name = "classify"

    def __init__(self, num_labels: int, class_weights: Sequence[float] = ()):
        self.num_labels = num_labels
        self.class_weights = (torch.tensor(list(class_weights), dtype=torch.float32)
                              if class_weights else None)

    def batch(self, samples: Sequence[dict[str, np.ndarray]], device: torch.device
              ) -> dict[str, torch.Tensor]:
        labels = stack(samples, "label", device)
        weights = (torch.ones(len(samples), device=device) if self.class_weights is None
                   else self.class_weights.to(device)[labels])
        batch = {"tokens": stack(samples, "tokens", device), "last": stack(samples, "last", device),
                 "labels": labels, "weights": weights}
        if "attend" in samples[0]:  # an encoder: padding is masked out of attention
            batch["attn_mask"] = stack(samples, "attend", device, torch.bool)[:, None, None, :]
        return batch

    @staticmethod
    def pooled(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, local labels) scores at each row's last real token (an encoder's head has
        pooled its first token already)."""
        if output.dim() == 2:
            return output
        rows = torch.arange(output.shape[0], device=output.device)
        return output[rows, batch["last"]]

    def loss_sum(self, output: torch.Tensor, batch: dict[str, torch.Tensor],
                 axis: Axis) -> torch.Tensor:
        losses = vocab_parallel_cross_entropy(self.pooled(output, batch), batch["labels"], axis,
                                              self.num_labels)
        return (losses * batch["weights"]).sum()

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["weights"].sum().item())

    def scores(self, output: torch.Tensor, batch: dict[str, torch.Tensor],
               axis: Axis) -> list[list[float]]:
        """Full label scores per row (the head's label columns gathered over tp)."""
        full = gather_last(self.pooled(output, batch).float(), axis)[:, :self.num_labels]
        return full.tolist()
