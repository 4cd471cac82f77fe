"""Shared pytest set-up: deterministic torch, quiet third-party warnings, offline HF."""

import os
import time
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def default_data(tmp_path_factory):
    """The embedded default corpus at the tiny recipe's vocabulary, built once per session:
    (cache dir, tokenizer path, dataset prefix, seconds the build took)."""
    from megaloom.data.default_corpus import ensure_default_data

    cache = tmp_path_factory.mktemp("megaloom-cache")
    start = time.perf_counter()
    tokenizer, prefix = ensure_default_data(str(cache), vocab_size=4096)
    return cache, tokenizer, prefix, time.perf_counter() - start
