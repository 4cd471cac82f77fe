"""Tokenize `.txt`/JSONL files into Megatron's `.bin`/`.idx` (`{prefix}_{json_key}_document`).

The parent process streams the inputs in chunks of about `chunk_bytes` (a chunk never spans two
files), worker processes decode and tokenize them, and the parent writes the results in input
order. At most `2 * workers` chunks are in flight, so memory stays bounded whatever the input
size, and since chunking does not depend on the worker count the output bytes do not either.
Outputs go to temporary names and are renamed only when complete (`IndexedWriter`).

Documents whose text tokenizes to nothing are skipped (and counted). Bad records (invalid UTF-8,
malformed JSON, missing key) raise `DataError` naming file:line, or with `skip_bad` are skipped
and counted.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult
from pathlib import Path

import numpy as np
from tqdm import tqdm

from megaloom.data.documents import (
    BadRecords,
    expand_inputs,
    file_kind,
    iter_raw_records,
    parse_record,
)
from megaloom.data.indexed import IndexedWriter, optimal_dtype
from megaloom.data.long_text import encode_documents
from megaloom.data.tokenizer import Tokenizer
from megaloom.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 1 << 20


def output_prefix(prefix: str | Path, json_key: str = "text") -> str:
    """Megatron's naming: `{prefix}_{json_key}_document` (also used for `.txt` inputs)."""
    return f"{prefix}_{json_key}_document"


@dataclass
class Chunk:
    """Consecutive raw records of one file."""

    path: Path
    kind: str
    records: list[tuple[int, bytes]]
    nbytes: int


@dataclass
class ChunkResult:
    tokens: np.ndarray
    lengths: np.ndarray
    bad: list[str] = field(default_factory=list)
    empty: int = 0
    nbytes: int = 0


@dataclass
class PreprocessStats:
    prefix: str
    documents: int = 0
    tokens: int = 0
    bad_skipped: int = 0
    empty_skipped: int = 0
    seconds: float = 0.0


class ChunkEncoder:
    """Decodes and tokenizes chunks; one lives in each worker process."""

    def __init__(self, tokenizer_path: str, json_key: str, append_eod: bool, skip_bad: bool
                 ) -> None:
        self.tokenizer = Tokenizer.from_file(tokenizer_path)
        self.dtype = optimal_dtype(self.tokenizer.vocab_size)
        self.json_key = json_key
        self.eod = [self.tokenizer.eod_id] if append_eod else []
        self.skip_bad = skip_bad

    def __call__(self, chunk: Chunk) -> ChunkResult:
        texts, lines, bad = [], [], []
        for line, raw in chunk.records:
            try:
                texts.append(parse_record(chunk.path, chunk.kind, line, raw, self.json_key))
                lines.append(line)
            except DataError as exc:
                if not self.skip_bad:
                    raise
                bad.append(str(exc))
        encoded = [ids for ids in encode_documents(self.tokenizer, texts, self.dtype,
                                                   lambda i: f"{chunk.path}:{lines[i]}")
                   if ids.size]
        eod = np.asarray(self.eod, dtype=self.dtype)
        lengths = np.fromiter((ids.size + eod.size for ids in encoded), dtype=np.int32,
                              count=len(encoded))
        pieces = [part for ids in encoded for part in (ids, eod)]
        tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)
        return ChunkResult(tokens, lengths, bad, len(texts) - len(encoded), chunk.nbytes)


def iter_chunks(files: Iterable[Path], chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk]:
    for path in files:
        kind = file_kind(path)
        records: list[tuple[int, bytes]] = []
        size = 0
        for line, raw in iter_raw_records(path, kind):
            records.append((line, raw))
            size += len(raw)
            if size >= chunk_bytes:
                yield Chunk(path, kind, records, size)
                records, size = [], 0
        if records:
            yield Chunk(path, kind, records, size)


_worker_encoder: ChunkEncoder | None = None


def _init_worker(*args) -> None:
    global _worker_encoder
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _worker_encoder = ChunkEncoder(*args)


def _encode_in_worker(chunk: Chunk) -> ChunkResult:
    return _worker_encoder(chunk)


def _ordered_bounded(submit: Callable[[Chunk], AsyncResult], chunks: Iterable[Chunk],
                     max_pending: int) -> Iterator[ChunkResult]:
    """Results in input order, with at most `max_pending` chunks submitted and unread."""
    pending: deque = deque()
    for chunk in chunks:
        pending.append(submit(chunk))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def preprocess(
    inputs: Iterable[str | Path],
    output: str | Path,
    tokenizer: str | Path,
    json_key: str = "text",
    append_eod: bool = False,
    workers: int = 1,
    skip_bad: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    show_progress: bool = True,
) -> PreprocessStats:
    """Tokenize `inputs` (files or directories) into `{output}_{json_key}_document.bin/.idx`."""
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    files = expand_inputs(inputs)
    encoder_args = (str(tokenizer), json_key, append_eod, skip_bad)
    encoder = ChunkEncoder(*encoder_args)  # validates the tokenizer (and EOD) up front
    stats = PreprocessStats(prefix=output_prefix(output, json_key))
    bad = BadRecords()
    start = time.perf_counter()
    total = sum(p.stat().st_size for p in files)
    logger.info("preprocessing %d file(s), %.1f MB, with %d worker(s)", len(files), total / 1e6,
                workers)
    chunks = iter_chunks(files, chunk_bytes)
    with IndexedWriter(stats.prefix, encoder.dtype) as writer, \
            tqdm(total=total, unit="B", unit_scale=True, desc="preprocess",
                 disable=not show_progress) as bar:
        if workers == 1:
            results: Iterable[ChunkResult] = map(encoder, chunks)
            _write_results(results, writer, stats, bad, bar)
        else:
            with mp.get_context("spawn").Pool(workers, _init_worker, encoder_args) as pool:
                results = _ordered_bounded(lambda c: pool.apply_async(_encode_in_worker, (c,)),
                                           chunks, 2 * workers)
                _write_results(results, writer, stats, bad, bar)
        bar.update(total - bar.n)
        if stats.documents == 0:  # nothing to train on (and megatron-core cannot map it)
            raise DataError(f"no documents with text in {', '.join(map(str, files))} "
                            f"({bad.count} bad record(s) skipped)")
    stats.bad_skipped = bad.count
    stats.seconds = time.perf_counter() - start
    logger.info("wrote %d documents, %d tokens to %s.bin/.idx in %.1f s", stats.documents,
                stats.tokens, stats.prefix, stats.seconds)
    if stats.bad_skipped:
        logger.warning("skipped %d bad record(s)", stats.bad_skipped)
    if stats.empty_skipped:
        logger.info("skipped %d empty document(s)", stats.empty_skipped)
    return stats


def _write_results(results: Iterable[ChunkResult], writer: IndexedWriter, stats: PreprocessStats,
                   bad: BadRecords, bar: tqdm) -> None:
    for result in results:
        writer.add_documents(result.tokens, result.lengths)
        stats.documents += len(result.lengths)
        stats.tokens += len(result.tokens)
        stats.empty_skipped += result.empty
        for message in result.bad:
            bad.add(message)
        bar.update(result.nbytes)
