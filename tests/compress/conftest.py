"""A small trained-looking model saved as a megaloom checkpoint, and calibration text."""

from pathlib import Path

import pytest
import torch

from megaloom.checkpoint.files import save_model_files
from megaloom.config import Config, ModelConfig
from megaloom.data.tokenizer import train_bpe
from megaloom.model.gpt import GPT

TEXT = " ".join(f"the {a} {b} walks to the {c} road." for a in ("red", "old", "tall", "shy")
                for b in ("fox", "cat", "man", "dog") for c in ("long", "wet", "new")) * 4


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compress")
    (root / "corpus.txt").write_text(TEXT)
    tokenizer = train_bpe([root / "corpus.txt"], vocab_size=300,
                          out_path=root / "tokenizer.json", min_frequency=1,
                          show_progress=False)
    # "dense-wide": projections wide enough for int4 groups of 128 under tp2
    for name, hidden, std in (("dense", 64, 0.1), ("dense-wide", 256, 0.05)):
        config = ModelConfig(arch="llama", num_layers=2, hidden_size=hidden, num_heads=4,
                             num_kv_heads=2, ffn_hidden_size=2 * hidden, seq_len=32,
                             vocab_size=tokenizer.vocab_size, init_std=std)
        torch.manual_seed(0)
        save_model_files(root / name, GPT(config), Config(model=config),
                         root / "tokenizer.json")
    return root
