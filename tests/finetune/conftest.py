"""Shared fixture: a small BPE tokenizer, tiny GPT-2, Llama and BERT base runs saved as megaloom
checkpoints, and the task data files."""

import random

import pytest
import torch
from finetune_helpers import WORDS, chat_records, cls_records, sft_records, write_jsonl

from megaloom.checkpoint.files import save_model_files
from megaloom.config import Config, ModelConfig, TaskConfig
from megaloom.data.masking import BERT_TOKENS
from megaloom.data.tokenizer import ENDOFTEXT, train_bpe
from megaloom.model.bert import BERT
from megaloom.model.gpt import GPT
from megaloom.model.t5 import T5


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    rng = random.Random(0)
    corpus = "\n\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(300))
    (root / "corpus.txt").write_text(corpus + "\nRepeat: User: Assistant:\n")
    train_bpe([root / "corpus.txt"], 300, root / "tokenizer.json", special_tokens=[ENDOFTEXT])
    for arch in ("gpt2", "llama"):
        extra = {"num_kv_heads": 2} if arch == "llama" else {}
        cfg = ModelConfig(
            arch=arch,
            num_layers=4,
            hidden_size=32,
            num_heads=4,
            seq_len=48,
            vocab_size=300,
            make_vocab_size_divisible_by=1,
            **extra,
        )
        torch.manual_seed(1)
        save_model_files(
            root / f"base-{arch}", GPT(cfg), Config(model=cfg), root / "tokenizer.json"
        )
    train_bpe([root / "corpus.txt"], 300, root / "tokenizer-bert.json",
              special_tokens=[ENDOFTEXT, *BERT_TOKENS])
    bert = ModelConfig(arch="bert", num_layers=2, hidden_size=32, num_heads=4, seq_len=48,
                       vocab_size=300, make_vocab_size_divisible_by=1)
    torch.manual_seed(1)
    save_model_files(root / "base-bert", BERT(bert), Config(model=bert, task=TaskConfig(
        name="mlm")), root / "tokenizer-bert.json")
    t5 = ModelConfig(arch="t5", num_layers=2, hidden_size=32, num_heads=4, seq_len=24,
                     decoder_seq_len=12, vocab_size=300, make_vocab_size_divisible_by=1,
                     dropout=0.0)
    torch.manual_seed(1)
    save_model_files(root / "base-t5", T5(t5), Config(model=t5, task=TaskConfig(name="span")),
                     root / "tokenizer.json")
    write_jsonl(root / "sft.jsonl", sft_records(24, seed=1))
    write_jsonl(root / "sft_valid.jsonl", sft_records(6, seed=2))
    write_jsonl(root / "chat.jsonl", chat_records(12, seed=3))
    write_jsonl(root / "cls.jsonl", cls_records(24, seed=4))
    write_jsonl(root / "cls_valid.jsonl", cls_records(8, seed=5))
    return root
