"""Megatron's indexed token format (`.bin` + `.idx`), byte-compatible with megatron-core's
`IndexedDataset`: a streaming writer and a memory-mapped reader.

Layout (little-endian): `.bin` holds the tokens of all sequences back to back. `.idx` holds the
magic `MMIDIDX\\0\\0`, `uint64` version 1, `uint8` dtype code, `uint64` sequence count N,
`uint64` document-index length D (documents + 1), then `int32[N]` sequence lengths,
`int64[N]` byte offsets into `.bin` and `int64[D]` document index (0, then the exclusive end
sequence of every document). megaloom writes one sequence per document.

The writer streams tokens to a temporary `.bin` and renames both files only when the index is
complete; the reader maps both files and validates the index against the `.bin` size, never
reading the token data.
"""

from __future__ import annotations

import struct
from array import array
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import numpy as np

from megaloom.errors import DataError
from megaloom.utils.io import atomic_path

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document-index length

DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """uint16 below 65,500 tokens of vocabulary, else int32 (Megatron's rule)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


class IndexedWriter:
    """Write documents to `prefix.bin`/`prefix.idx`, atomically.

    Use as a context manager; the final names appear only when the block exits without an
    exception, otherwise the temporary files are removed and existing outputs are untouched:

        with IndexedWriter(prefix, np.uint16) as writer:
            writer.add_document(ids)
    """

    def __init__(self, prefix: str | Path, dtype: type[np.number] | np.dtype) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"unsupported token dtype {self.dtype}")
        self._lengths = array("i")
        self._stack = ExitStack()
        self._bin: BinaryIO | None = None
        self._idx_tmp: Path | None = None

    def __enter__(self) -> IndexedWriter:
        with ExitStack() as stack:
            # idx is entered last, so on success it is renamed first; the .bin then completes
            # the pair. On error both temporaries are removed.
            bin_tmp = stack.enter_context(atomic_path(bin_path(self.prefix)))
            self._idx_tmp = stack.enter_context(atomic_path(idx_path(self.prefix)))
            self._bin = stack.enter_context(open(bin_tmp, "wb"))
            self._stack = stack.pop_all()
        return self

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        """Append one document (a single sequence)."""
        self.add_documents(np.asarray(tokens), np.array([len(tokens)], dtype=np.int32))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append several documents given as one flat token array and their lengths."""
        if self._bin is None:
            raise RuntimeError("IndexedWriter must be used as a context manager")
        if int(np.sum(lengths, dtype=np.int64)) != len(tokens):
            raise ValueError("document lengths do not add up to the number of tokens")
        flat = np.asarray(tokens)
        if flat.dtype != self.dtype:
            if flat.size and (flat.min() < np.iinfo(self.dtype).min
                              or flat.max() > np.iinfo(self.dtype).max):
                raise ValueError(f"token ids out of range for {self.dtype}")
            flat = flat.astype(self.dtype)
        self._bin.write(flat.tobytes())
        self._lengths.extend(np.asarray(lengths, dtype=np.int32).tolist())

    def __exit__(self, exc_type, exc, tb) -> None:
        stack, self._stack = self._stack, ExitStack()
        with stack:
            if exc is not None:
                raise exc  # inside the stack, so the temporary files are removed
            write_index(self._idx_tmp, self.dtype, np.frombuffer(self._lengths, np.int32))


def write_index(path: Path, dtype: np.dtype, lengths: np.ndarray) -> None:
    """Write an `.idx` for one sequence per document with the given sequence lengths."""
    n = len(lengths)
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= itemsize
    doc_index = np.arange(n + 1, dtype=np.int64)
    with open(path, "wb") as handle:
        handle.write(HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[np.dtype(dtype)], n, n + 1))
        handle.write(np.asarray(lengths, dtype="<i4").tobytes())
        handle.write(pointers.astype("<i8").tobytes())
        handle.write(doc_index.astype("<i8").tobytes())


class IndexedReader:
    """Memory-mapped reader of `prefix.bin`/`prefix.idx` (any writer that follows the format).

    `reader[i]` is sequence i as a read-only view; `document_tokens(d)` the tokens of document d.
    Pickles by path, so DataLoader workers reopen the maps instead of copying them.
    """

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = str(prefix)
        self._open()

    def _open(self) -> None:
        idx, binp = idx_path(self.prefix), bin_path(self.prefix)
        for path in (idx, binp):
            if not path.is_file():
                raise DataError(f"{path}: not found (expected {self.prefix}.bin and .idx)")
        idx_size = idx.stat().st_size
        if idx_size < HEADER.size:
            raise DataError(f"{idx}: truncated index ({idx_size} bytes, header needs "
                            f"{HEADER.size})")
        with open(idx, "rb") as handle:
            magic, version, code, n, d = HEADER.unpack(handle.read(HEADER.size))
        if magic != MAGIC:
            raise DataError(f"{idx}: not a Megatron index file (bad magic {magic!r})")
        if version != VERSION:
            raise DataError(f"{idx}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPE_CODES:
            raise DataError(f"{idx}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        body = n * 4 + n * 8 + d * 8
        if idx_size not in (HEADER.size + body, HEADER.size + body + n):  # + n: multimodal modes
            raise DataError(f"{idx}: index size {idx_size} bytes does not match its header "
                            f"({n} sequences, {d} document entries); truncated or corrupt")
        mm = np.memmap(idx, mode="r", dtype=np.uint8)
        offset = HEADER.size
        self.sequence_lengths = np.frombuffer(mm, "<i4", n, offset)
        self.sequence_pointers = np.frombuffer(mm, "<i8", n, offset + 4 * n)
        self.document_indices = np.frombuffer(mm, "<i8", d, offset + 12 * n)
        if d < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != n:
            raise DataError(f"{idx}: document index must start at 0 and end at {n}")
        bin_size = binp.stat().st_size
        expected = (int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1])
                    * self.dtype.itemsize) if n else 0
        if bin_size != expected:
            raise DataError(f"{binp}: size {bin_size} bytes does not match its index "
                            f"({expected} bytes expected); truncated or from another run")
        self._tokens = (np.memmap(binp, mode="r", dtype=self.dtype) if bin_size
                        else np.empty(0, dtype=self.dtype))

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self._tokens[start:start + int(self.sequence_lengths[i])]

    def document_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """Token offset (in elements) and token count of every document; a document's
        sequences are contiguous in `.bin`."""
        first, end = self.document_indices[:-1], self.document_indices[1:]
        n = len(self)
        if n == 0:
            zeros = np.zeros(self.num_documents, dtype=np.int64)
            return zeros, zeros.copy()
        seq_start = self.sequence_pointers // self.dtype.itemsize
        seq_end = seq_start + self.sequence_lengths
        starts = np.append(seq_start, self.num_tokens)[first]
        ends = np.where(end > first, seq_end[np.maximum(end - 1, 0)], starts)
        return starts.astype(np.int64), (ends - starts).astype(np.int64)

    def tokens(self, start: int, count: int) -> np.ndarray:
        """`count` tokens from element offset `start` of the `.bin` (a view, no copy)."""
        return self._tokens[start:start + count]
