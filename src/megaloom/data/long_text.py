"""Encoding documents of any length in bounded memory, with the ids of encoding them whole.

A `tokenizers` encoding keeps offsets, masks and type ids beside every id (about 190 bytes
per character of text, measured on a 30 MB line), so a document is encoded in pieces of at
most `PIECE_CHARS` characters, and at most `BATCH_CHARS` characters are encoded at once.

The cut is exact for byte-level BPE with the GPT-2 split pattern (megaloom's own tokenizers,
GPT-2's): a single space between two non-space characters always starts a new pre-token
(" word", " 123", " ..."), no pre-token runs across it, and BPE merges stay within a
pre-token, so the pieces' ids concatenated equal the whole text's. A text with no such space
for longer than a piece (a base64 blob) stays one piece. Other tokenizers (SentencePiece
style, normalizers) are not cut: their documents are encoded whole, and one longer than
`UNCUT_LIMIT_CHARS` is refused rather than exhausting memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np
from tokenizers import pre_tokenizers

from megaloom.errors import DataError

PIECE_CHARS = 1 << 16
BATCH_CHARS = 1 << 20
UNCUT_LIMIT_CHARS = 16 << 20

_CUT = re.compile(r"(?<=\S) (?=\S)")


def cuts_exactly(hf_tokenizer) -> bool:
    """Whether texts may be cut at `_CUT` spaces without changing their ids."""
    pre = hf_tokenizer.pre_tokenizer
    spaced = any(" " in token.content
                 for token in hf_tokenizer.get_added_tokens_decoder().values())
    return (isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex
            and hf_tokenizer.normalizer is None and not spaced)


def split_for_encoding(text: str, piece_chars: int | None = None) -> list[str]:
    """`text` in pieces of at most `piece_chars` (default `PIECE_CHARS`) characters where a
    cut exists, each piece after the first starting at a space between two non-spaces."""
    piece_chars = piece_chars or PIECE_CHARS
    pieces, start = [], 0
    while len(text) - start > piece_chars:
        # cuts at start + 1 .. start + piece_chars (endpos one further for the lookahead)
        window = _CUT.finditer(text, start + 1, start + piece_chars + 2)
        cut = max((m.start() for m in window), default=None)
        if cut is None:  # no cut that short: the first one after it
            found = _CUT.search(text, start + 1)
            if found is None:
                break
            cut = found.start()
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _pieces(texts: Sequence[str], cut: bool, name) -> Iterator[tuple[int, str]]:
    for index, text in enumerate(texts):
        if cut:
            for piece in split_for_encoding(text):
                yield index, piece
            continue
        if len(text) > UNCUT_LIMIT_CHARS:
            raise DataError(f"{name(index)}: a document of {len(text):,} characters is over "
                            f"the {UNCUT_LIMIT_CHARS:,}-character limit for a tokenizer that "
                            "cannot be cut exactly (not byte-level BPE); split the document")
        yield index, text


def encode_documents(tokenizer, texts: Sequence[str], dtype: np.dtype,
                     name=lambda index: f"document {index + 1}") -> list[np.ndarray]:
    """Each text's token ids as an array of `dtype`, encoded in bounded memory; `name(i)`
    names document i in errors."""
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    batch: list[tuple[int, str]] = []
    size = 0

    def flush() -> None:
        for (index, _), ids in zip(batch, tokenizer.encode_batch([p for _, p in batch]),
                                   strict=True):
            parts[index].append(np.asarray(ids, dtype=dtype))
        batch.clear()

    for item in _pieces(texts, cuts_exactly(tokenizer.hf), name):
        batch.append(item)
        size += len(item[1])
        if size >= BATCH_CHARS:
            flush()
            size = 0
    flush()
    return [np.concatenate(p) if p else np.empty(0, dtype=dtype) for p in parts]
