"""Shared fixtures of the data tests: a small mixed corpus, a tokenizer trained on it, and
megatron-core's indexed dataset module (imported with its CPU-only warnings silenced)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from megaloom.data.tokenizer import train_bpe

PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pack my box with five dozen liquor jugs.\nSphinx of black quartz, judge my vow.",
    "Unicode too: naïve café, Ελληνικά, 日本語のテキスト, emoji 🚀✨.",
    "    indented code\n\tand tabs\n",
    "Numbers 0123456789 and symbols !@#$%^&*()[]{}<>?",
]


def _texts(n: int) -> list[str]:
    return [f"{PARAGRAPHS[i % len(PARAGRAPHS)]} Document {i} says {'la ' * (i % 13)}end."
            for i in range(n)]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, object]:
    """`docs.jsonl` (one object per line, blank lines between some) and `notes.txt`
    (blank-line separated paragraphs); returns their paths and the expected document texts."""
    root = tmp_path_factory.mktemp("corpus")
    jsonl_texts = _texts(120)
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(jsonl_texts):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
            if i % 17 == 0:
                f.write("\n")
    txt_texts = [t.replace("\n\n", "\n") for t in _texts(40)]
    txt_texts = [t.strip("\n") for t in txt_texts]
    (root / "notes.txt").write_text("\n\n\n".join(txt_texts) + "\n", encoding="utf-8")
    return {"dir": root, "jsonl": root / "docs.jsonl", "txt": root / "notes.txt",
            "jsonl_texts": jsonl_texts, "txt_texts": txt_texts}


@pytest.fixture(scope="session")
def tokenizer_path(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([corpus["dir"]], 400, out, show_progress=False)
    return out


@pytest.fixture(scope="session")
def mcore_indexed():
    """megatron.core.datasets.indexed_dataset, the compatibility reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset
