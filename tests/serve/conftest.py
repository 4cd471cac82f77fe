"""Shared fixtures for the server tests: a tiny checkpoint (byte-level BPE + 2-layer GPT) and
live uvicorn servers on 127.0.0.1 (a free port, a background thread, loopback only)."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from megaloom.checkpoint.files import save_model_files
from megaloom.config import Config, ModelConfig
from megaloom.data.tokenizer import Tokenizer, train_bpe
from megaloom.infer import Engine
from megaloom.loading import load_model
from megaloom.model.gpt import GPT
from megaloom.serve import create_app

SUBJECTS = ["the fox", "a writer", "the old sailor", "my neighbour", "the river", "a small cat"]
VERBS = ["walks to", "writes about", "dreams of", "looks at", "sings to", "remembers"]
OBJECTS = ["the quiet sea", "a bright morning", "the long road", "an empty house",
           "the winter garden", "a red kite"]


def corpus(count: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} "
                     f"{rng.choice(OBJECTS)}." for _ in range(count))


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    (root / "corpus.txt").write_text(corpus(), encoding="utf-8")
    tok = train_bpe([root / "corpus.txt"], vocab_size=300, out_path=root / "tokenizer.json",
                    min_frequency=1, show_progress=False)
    torch.manual_seed(0)
    model_config = ModelConfig(arch="gpt2", num_layers=2, hidden_size=64, num_heads=4,
                               seq_len=128, vocab_size=tok.vocab_size, init_std=0.3)
    return save_model_files(root / "model", GPT(model_config), Config(model=model_config),
                            root / "tokenizer.json")


@dataclass
class Loaded:
    model: GPT
    tokenizer: Tokenizer
    tokenizer_path: Path

    def engine(self, max_batch_size: int = 8) -> Engine:
        return Engine(self.model, self.tokenizer, max_batch_size=max_batch_size)


@pytest.fixture(scope="session")
def loaded(checkpoint) -> Loaded:
    model, _, tokenizer_path = load_model(checkpoint)
    return Loaded(model, Tokenizer.from_file(tokenizer_path), tokenizer_path)


@dataclass
class Live:
    url: str
    app: object
    server: uvicorn.Server

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 30, **kwargs})


@contextmanager
def live_server(loaded: Loaded, engine: Engine | None = None, **options) -> Iterator[Live]:
    """Run `create_app` under uvicorn on 127.0.0.1 in a thread until the block ends."""
    app = create_app(engine or loaded.engine(), loaded.tokenizer, "tiny",
                     tokenizer_path=loaded.tokenizer_path, **options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield Live(f"http://127.0.0.1:{port}", app, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def server(loaded) -> Iterator[Live]:
    with live_server(loaded) as live:
        yield live


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


class SlowEngine(Engine):
    """An engine whose steps take at least `delay` seconds, to observe requests in flight."""

    def __init__(self, *args, delay: float = 0.02, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = delay

    def step(self):
        time.sleep(self.delay)
        return super().step()


@pytest.fixture(scope="session")
def make_server(loaded):
    """`make_server(engine=None, **create_app_options)`: a context manager for a live server."""
    return lambda engine=None, **options: live_server(loaded, engine, **options)


@pytest.fixture(scope="session")
def slow_engine(loaded):
    """`slow_engine(max_batch_size, delay)`: a fresh engine whose steps take >= delay."""
    return lambda max_batch_size=4, delay=0.02: SlowEngine(
        loaded.model, loaded.tokenizer, max_batch_size=max_batch_size, delay=delay)
