"""Perplexity of raw text under three named protocols (they give different numbers).

- `strided` (Hugging Face's perplexity guide): each document on its own, preceded by the
  end-of-document token (so its first token is predicted, as after a document boundary in
  training); windows of `max_length` tokens start every `stride` tokens and score only the
  targets no earlier window scored (a window's first token is context only). With every
  document token scored, word perplexity `exp(-LL / words)` and bits per byte
  `-LL / (bytes ln 2)` are reported as lm-eval defines them.
- `chunks` (Wanda / SparseGPT on WikiText-2): the documents joined by blank lines, cut into
  non-overlapping `max_length`-token chunks, the tail dropped; every chunk scores all its
  tokens but the first.
- `megatron` (Megatron-LM's WikiText eval): the joined text as one stream, windows as in
  `strided` with `stride` as Megatron's `overlapping_eval`, plus its word-adjusted perplexity
  `exp(LL_mean * (T - 1) / (W - 1))`, with T the stream's tokens and W its space-separated
  words (`text.strip().split(" ")`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megaloom.errors import DataError
from megaloom.evaluate.scoring import Scorer, Window
from megaloom.tasks.records import BadRecords, read_records

PROTOCOLS = ("strided", "chunks", "megatron")
JOINER = "\n\n"


@dataclass(frozen=True)
class Document:
    where: str
    text: str


def strided_windows(tokens: Sequence[int], max_length: int, stride: int) -> list[Window]:
    """Hugging Face's strided loop: windows of `max_length` every `stride` tokens, each
    scoring the targets after the previous window's end."""
    windows, previous_end = [], 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + max_length, len(tokens))
        scored = min(end - previous_end, end - begin - 1)
        windows.append(Window(tokens[begin:end], scored))
        previous_end = end
        if end == len(tokens):
            break
    return windows


def chunk_windows(tokens: Sequence[int], max_length: int) -> list[Window]:
    """Non-overlapping `max_length` chunks, the tail dropped; all but the first token scored."""
    return [Window(tokens[i:i + max_length], max_length - 1)
            for i in range(0, len(tokens) - max_length + 1, max_length)]


def check_lengths(max_length: int, stride: int, seq_len: int) -> None:
    if not 2 <= max_length <= seq_len + 1:
        raise DataError(f"--max-length must be in [2, {seq_len + 1}] (the model's seq_len + 1)"
                        f", got {max_length}")
    if not 1 <= stride <= max_length - 1:
        raise DataError(f"--stride must be in [1, --max-length - 1 = {max_length - 1}], got "
                        f"{stride}")


def document_tokens(tokenizer, document: Document) -> list[int]:
    tokens = tokenizer.encode(document.text)
    if len(tokens) < 2:
        raise DataError(f"{document.where}: the text is shorter than two tokens")
    return tokens


def perplexity(scorer: Scorer, tokenizer, documents: Sequence[Document], protocol: str,
               max_length: int, stride: int, bad: BadRecords) -> dict:
    """The report of `protocol` over `documents` (`max_length`/`stride` already checked)."""
    if protocol == "strided":
        windows, kept = [], []
        for document in documents:
            tokens = bad.check(document_tokens, tokenizer, document)
            if tokens is not None:
                kept.append(document)
                windows += strided_windows([tokenizer.eod_id, *tokens], max_length, stride)
        documents = kept
        if not documents:
            raise DataError("no document left to score")
        stream_tokens = None
        name = (f"strided (Hugging Face guide): each document after the end-of-document token, "
                f"windows of {max_length} tokens every {stride}, new targets only")
    else:
        text = JOINER.join(d.text for d in documents)
        tokens = tokenizer.encode(text)
        stream_tokens = len(tokens)
        if protocol == "chunks":
            if len(tokens) < max_length:
                raise DataError(f"the text has {len(tokens)} tokens, fewer than one "
                                f"{max_length}-token chunk")
            windows = chunk_windows(tokens, max_length)
            name = (f"chunks (Wanda/SparseGPT): documents joined by blank lines, "
                    f"non-overlapping {max_length}-token chunks, tail of "
                    f"{len(tokens) % max_length} tokens dropped")
        else:
            windows = strided_windows(tokens, max_length, stride)
            name = (f"megatron (Megatron-LM WikiText eval): documents joined by blank lines, "
                    f"windows of {max_length} tokens, overlapping_eval {stride}")
    scored = scorer.score(windows, desc=f"perplexity ({protocol})")
    total = math.fsum(s.total for s in scored)
    count = sum(w.scored for w in windows)
    report = {"protocol": name, "documents": len(documents), "windows": len(windows),
              "tokens_scored": count, "nll": -total / count,
              "perplexity": math.exp(-total / count)}
    words = sum(len(d.text.split()) for d in documents)
    text_bytes = sum(len(d.text.encode("utf-8")) for d in documents)
    if protocol == "strided":
        report["word_perplexity"] = math.exp(-total / words)
        report["bits_per_byte"] = -total / text_bytes / math.log(2)
    elif protocol == "megatron":
        joined = JOINER.join(d.text for d in documents)
        megatron_words = len(joined.strip().split(" "))
        report["megatron_words"] = megatron_words
        report["adjusted_perplexity"] = math.exp(
            -total / count * (stream_tokens - 1) / max(megatron_words - 1, 1))
        report["bits_per_byte"] = -total / len(joined.encode("utf-8")) / math.log(2)
    return report


def read_documents(path: str | Path, field: str, bad: BadRecords) -> list[Document]:
    """A `.txt` file as one document, or the `field` of every JSONL record."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}: not UTF-8 text") from None
        if not text.strip():
            raise DataError(f"{path}: no text")
        return [Document(str(path), text)]
    documents = [bad.check(lambda r: Document(r.where, r.text(field)), record)
                 for record in read_records(path, bad)]
    return [d for d in documents if d is not None]
