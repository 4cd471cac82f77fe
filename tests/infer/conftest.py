"""Shared fixtures for inference tests: a tiny byte-level BPE tokenizer and tiny models."""

from __future__ import annotations

import pytest
import torch

from megaloom.checkpoint.files import save_model_files
from megaloom.config import Config, ModelConfig
from megaloom.data.tokenizer import Tokenizer, train_bpe
from megaloom.model.gpt import GPT

TEXT = """The quick brown fox jumps over the lazy dog.
Pack my box with five dozen liquor jugs. The end of the story is near.
How vexingly quick daft zebras jump! Stop here, or go on? Café naïve résumé 日本語.
Sphinx of black quartz, judge my vow. The dog sleeps; the fox runs away, quick and brown.
"""


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tok")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT * 3, encoding="utf-8")
    train_bpe([corpus], vocab_size=320, out_path=root / "tokenizer.json", min_frequency=1,
              show_progress=False)
    return str(root / "tokenizer.json")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_path)


@pytest.fixture(scope="session")
def make_model():
    return build_model


def build_model(arch: str = "gpt2", vocab_size: int = 320, seq_len: int = 128, seed: int = 0,
               std: float = 0.3) -> GPT:
    """A tiny model with large init so its distributions are far from uniform."""
    torch.manual_seed(seed)
    config = ModelConfig(arch=arch, num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                         seq_len=seq_len, vocab_size=vocab_size, init_std=std)
    return GPT(config).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer_path, make_model) -> str:
    """A saved tiny Llama checkpoint directory with the test tokenizer beside it."""
    tok = Tokenizer.from_file(tokenizer_path)
    model = make_model("llama", vocab_size=tok.vocab_size)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    save_model_files(path, model, Config(model=model.config), tokenizer_path)
    return str(path)
