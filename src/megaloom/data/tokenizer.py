"""Text <-> token ids: a thin wrapper over a Hugging Face `tokenizers` `tokenizer.json`, and
byte-level BPE training.

Owns `Tokenizer` (load any `tokenizer.json`, encode/decode, true vocabulary size, the
end-of-document id) and `train_bpe`. Encoding never adds special tokens unless asked: the
pretraining stream gets its end-of-document token from `--append-eod`, and token-id prompts
must round-trip exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from megaloom.data.documents import BadRecords, expand_inputs, iter_documents
from megaloom.data.long_text import split_for_encoding
from megaloom.errors import DataError
from megaloom.utils.io import atomic_write_text

logger = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
"""The end-of-document token of tokenizers trained by megaloom (GPT-2's spelling)."""

EOD_CANDIDATES = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>",
                  "<|eot_id|>", "[SEP]")
"""Tokens recognised as end-of-document in a loaded `tokenizer.json`, most specific first."""


class Tokenizer:
    """A loaded `tokenizer.json` with the few operations megaloom needs."""

    def __init__(self, hf: HFTokenizer, source: str = "<memory>") -> None:
        self.hf = hf
        self.source = source
        vocab = hf.get_vocab(with_added_tokens=True)
        self._vocab_size = max(hf.get_vocab_size(with_added_tokens=True),
                               max(vocab.values(), default=-1) + 1)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise DataError(f"{path}: not a valid tokenizer.json ({exc})") from None
        return cls(hf, source=str(path))

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, special tokens included."""
        return self._vocab_size

    @property
    def eod_token(self) -> str:
        """The end-of-document token text; `DataError` when the tokenizer has none."""
        vocab = self.hf.get_vocab(with_added_tokens=True)
        for token in EOD_CANDIDATES:
            if token in vocab:
                return token
        raise DataError(f"{self.source}: no end-of-document token found (looked for "
                        f"{', '.join(EOD_CANDIDATES)}); retrain with megaloom tokenizer train "
                        "or add one of them as a special token")

    @property
    def eod_id(self) -> int:
        return int(self.hf.token_to_id(self.eod_token))

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False
                     ) -> list[list[int]]:
        encodings = self.hf.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` atomically."""
        atomic_write_text(path, self.hf.to_str(pretty=True))


MAX_VOCAB_SIZE = 1 << 21


def train_bpe(
    files: Iterable[str | Path],
    vocab_size: int,
    out_path: str | Path,
    json_key: str = "text",
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    skip_bad: bool = False,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style, no unknown tokens) on `.txt`/JSONL files or
    directories, save it to `out_path` and return it. `special_tokens` get the first ids."""
    if vocab_size < 256 + len(special_tokens):
        raise DataError(f"vocab size {vocab_size} is too small: byte-level BPE needs at least "
                        f"256 byte tokens plus {len(special_tokens)} special token(s)")
    if vocab_size > MAX_VOCAB_SIZE:
        raise DataError(f"vocab size {vocab_size} is too large: at most {MAX_VOCAB_SIZE:,} "
                        "(the largest published vocabularies are about 256k)")
    out_path = Path(out_path)
    if out_path.is_dir():
        out_path = out_path / "tokenizer.json"
    paths = expand_inputs(files)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    bad = BadRecords() if skip_bad else None
    logger.info("training byte-level BPE (vocab %d) on %d file(s)", vocab_size, len(paths))
    seen = [0]

    def counted():  # long documents in pieces: the same pre-tokens, so the same counts
        for text in iter_documents(paths, json_key, bad):
            seen[0] += bool(text.strip())
            yield from split_for_encoding(text)

    hf.train_from_iterator(counted(), trainer=trainer)
    if not seen[0]:
        raise DataError(f"no text to train on in {', '.join(map(str, paths))}")
    if bad is not None and bad.count:
        logger.warning("skipped %d bad record(s)", bad.count)
    tokenizer = Tokenizer(hf, source=str(out_path))
    tokenizer.save(out_path)
    logger.info("saved tokenizer (vocab %d) to %s", tokenizer.vocab_size, out_path)
    return tokenizer
