"""The `classify` task: a fine-tuned classifier (`megaloom finetune --task classify`, or an
imported `*ForSequenceClassification`) on JSONL `text` + `label`, scored by scikit-learn.

Texts are cut to `seq_len` (counted), padded on the right, and each row's label scores are read
at its last real token, as in training (a BERT classifier reads `[CLS] text [SEP]` and pools
its first token, padding masked). Labels must be among the model's own (`task.labels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from megaloom.errors import DataError
from megaloom.evaluate import metrics
from megaloom.tasks.classify import Framing
from megaloom.tasks.records import BadRecords, Record


def read_example(record: Record, labels: Sequence[str]) -> tuple[str, int]:
    text = record.text("text")
    label = record.fields.get("label")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise DataError(f"{record.where}: field 'label' must be a string or an integer")
    if str(label) not in labels:
        raise DataError(f"{record.where}: label {label!r} is not one of the model's labels "
                        f"({', '.join(labels)})")
    return text, list(labels).index(str(label))


@torch.inference_mode()
def predict(model, rows: Sequence[list[int]], num_labels: int, batch_size: int,
            device: torch.device, progress: bool) -> list[int]:
    """The argmax label of every row of (framed) token ids: a decoder's scores at the last
    token, an encoder's pooled scores with the padding masked."""
    predicted = []
    for start in tqdm(range(0, len(rows), batch_size), desc="classify", unit="batch",
                      disable=None if progress else True):
        chunk = rows[start:start + batch_size]
        width = max(len(r) for r in chunk)
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        attend = torch.zeros(len(chunk), width, dtype=torch.bool)
        for i, row in enumerate(chunk):
            tokens[i, :len(row)] = torch.as_tensor(row)
            attend[i, :len(row)] = True
        if model.config.causal:
            scores = model(tokens.to(device))
            last = torch.as_tensor([len(r) - 1 for r in chunk], device=scores.device)
            scores = scores[torch.arange(len(chunk), device=scores.device), last]
        else:
            scores = model(tokens.to(device), attn_mask=attend.to(device)[:, None, None, :])
        predicted.extend(scores[:, :num_labels].float().argmax(-1).tolist())
    return predicted


def classify(model, tokenizer, labels: Sequence[str], records: Sequence[Record], seq_len: int,
             batch_size: int, device: torch.device, bad: BadRecords, progress: bool) -> dict:
    examples = [e for e in (bad.check(read_example, r, labels) for r in records) if e]
    if not examples:
        raise DataError("no text left to classify")
    framing = Framing.for_model(model.config, tokenizer)
    rows, truncated = [], 0
    for text, _ in examples:
        ids = tokenizer.encode(text)
        if not ids:
            raise DataError(f"a text encodes to no tokens: {text[:40]!r}")
        row, cut = framing.frame(ids, seq_len)
        truncated += cut
        rows.append(row)
    predicted = predict(model, rows, len(labels), batch_size, device, progress)
    report = summary([label for _, label in examples], predicted, labels)
    pooling = ("the pooled [CLS] token" if framing.encoder
               else "the classifier head at each text's last token")
    return {**report, "protocol": f"{pooling}; {report['protocol']}",
            "documents": len(examples), "truncated": truncated}


def summary(true: Sequence[int], predicted: Sequence[int], labels: Sequence[str]) -> dict:
    """scikit-learn's metrics, the majority-class baseline and every prediction by name."""
    majority = float(np.bincount(true, minlength=len(labels)).max() / len(true))
    return {**metrics.classification(true, predicted, labels), "majority_baseline": majority,
            "predictions": [labels[p] for p in predicted]}
