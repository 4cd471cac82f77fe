"""The special tokens of a tokenizer, from one source for every reader (`megaloom serve`'s
`/tokenizer_info` and chat template, `megaloom convert`'s tokenizer files).

They come from `tokenizer_config.json` beside `tokenizer.json` when there is one (an imported
Hugging Face tokenizer), else from well-known spellings in the vocabulary: the end-of-document
token megaloom trains with, and for GPT-2-style tokenizers `<|endoftext|>` as bos too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from megaloom.data.tokenizer import ENDOFTEXT, Tokenizer
from megaloom.errors import DataError

TOKENIZER_CONFIG = "tokenizer_config.json"
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "[CLS]")

log = logging.getLogger(__name__)


def token_text(value: Any) -> str | None:
    """A special token as `tokenizer_config.json` writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_config(tokenizer_path: str | Path | None) -> dict[str, Any]:
    """`tokenizer_config.json` beside the tokenizer (file or directory); {} when absent or
    unreadable (with a warning)."""
    if tokenizer_path is None:
        return {}
    path = Path(tokenizer_path)
    path = (path if path.is_dir() else path.parent) / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    return config if isinstance(config, dict) else {}


def special_tokens(tokenizer_path: str | Path) -> dict[str, str | None]:
    """`bos_token` / `eos_token` texts of the tokenizer at `tokenizer_path`."""
    config = tokenizer_config(tokenizer_path)
    if config:
        return {"bos_token": token_text(config.get("bos_token")),
                "eos_token": token_text(config.get("eos_token"))}
    tokenizer = Tokenizer.from_file(tokenizer_path)
    try:
        eos = tokenizer.eod_token
    except DataError:
        eos = None
    bos = next((t for t in BOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
    if bos is None and eos == ENDOFTEXT:  # GPT-2 uses <|endoftext|> for both
        bos = eos
    return {"bos_token": bos, "eos_token": eos}
