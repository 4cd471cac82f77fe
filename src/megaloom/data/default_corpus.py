"""The embedded default corpus: documentation text that ships with every Python install.

Documents are the `pydoc_data.topics` help texts (the language reference behind `help()`) and,
one document per module, the docstrings and comment blocks of the standard library's own `.py`
sources (tests excluded), read with `ast` and `tokenize` so nothing is imported or executed.
That is about 4 MB of English technical prose on CPython 3.11. `ensure_default_data` writes it
as JSONL, trains a byte-level BPE and preprocesses it once, caching everything under
`cache_dir` keyed by Python version and vocabulary size; later calls return the cached paths.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import random
import sys
import sysconfig
import tokenize
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from megaloom.data.preprocess import output_prefix, preprocess
from megaloom.data.tokenizer import ENDOFTEXT, train_bpe
from megaloom.utils.io import atomic_dir

logger = logging.getLogger(__name__)

CORPUS_VERSION = 1
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def pydoc_topics() -> Iterator[str]:
    """The `help()` topic texts (a data-only module)."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name].strip()


def stdlib_documents(root: Path | None = None) -> Iterator[str]:
    """Per stdlib module: its module, class and function docstrings, then its comment blocks,
    blank-line separated."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if EXCLUDED_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            source = path.read_bytes()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes in old sources
                tree = ast.parse(source)
            comments = comment_blocks(source)
        except (SyntaxError, ValueError, OSError, tokenize.TokenError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef))]
        text = "\n\n".join([d.strip() for d in docs if d and d.strip()] + comments)
        if text:
            yield text


def comment_blocks(source: bytes, min_chars: int = 40) -> list[str]:
    """Runs of comments on consecutive lines, without the `#`, of at least `min_chars`."""
    blocks: list[list[str]] = []
    last_line = -2
    for token in tokenize.tokenize(io.BytesIO(source).readline):
        if token.type != tokenize.COMMENT or token.string.startswith("#!"):
            continue
        text = token.string.lstrip("#").strip()
        if token.start[0] != last_line + 1 or not blocks:
            blocks.append([])
        blocks[-1].append(text)
        last_line = token.start[0]
    joined = ("\n".join(line for line in block if line).strip() for block in blocks)
    return [b for b in joined if len(b) >= min_chars and "coding" not in b[:30]]


def corpus_documents() -> list[str]:
    """All default-corpus documents in a fixed, shuffled order (so the valid and test splits
    mix both sources)."""
    documents = [d for d in pydoc_topics() if d] + list(stdlib_documents())
    random.Random(0).shuffle(documents)
    return documents


def ensure_default_data(cache_dir: str, vocab_size: int = 4096,
                        extra_tokens: Sequence[str] = ()) -> tuple[str, str]:
    """Build (once) and return `(tokenizer_json_path, dataset_prefix)` of the default corpus;
    `extra_tokens` are special tokens the tokenizer gets after the end-of-document token
    (BERT's `[CLS]`, `[SEP]`, `[MASK]`)."""
    version = ".".join(map(str, sys.version_info[:3]))
    tag = ("-" + hashlib.sha256("\n".join(extra_tokens).encode()).hexdigest()[:8]
           if extra_tokens else "")
    entry = Path(cache_dir) / f"default-corpus-py{version}-v{vocab_size}-c{CORPUS_VERSION}{tag}"
    tokenizer_path = entry / "tokenizer.json"
    prefix = output_prefix(entry / "corpus", "text")
    if not (entry / "done").is_file():
        logger.info("building the default corpus (Python %s docs) in %s", version, entry)
        with atomic_dir(entry) as tmp:
            corpus = tmp / "corpus.jsonl"
            with open(corpus, "w", encoding="utf-8") as handle:
                for text in corpus_documents():
                    handle.write(json.dumps({"text": text}) + "\n")
            train_bpe([corpus], vocab_size, tmp / "tokenizer.json", show_progress=False,
                      special_tokens=(ENDOFTEXT, *extra_tokens))
            preprocess([corpus], tmp / "corpus", tmp / "tokenizer.json", append_eod=True)
            corpus.unlink()
            (tmp / "done").write_text("ok\n", encoding="utf-8")
    return str(tokenizer_path), prefix
