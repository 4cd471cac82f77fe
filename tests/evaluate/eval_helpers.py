"""Helpers of the evaluation tests: a small corpus, a language model and a classifier saved as
megaloom checkpoints and exported to Hugging Face format (random weights, built locally), and
task data files."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "lm_eval"
sys.path.insert(0, str(EXAMPLES))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import make_data  # noqa: E402  (examples/lm_eval: the toy grammar the test model learns)
import torch  # noqa: E402

from megaloom.checkpoint.files import save_model_files  # noqa: E402
from megaloom.config import Config, ModelConfig, TaskConfig  # noqa: E402
from megaloom.data.tokenizer import train_bpe  # noqa: E402
from megaloom.interop.hf import export_hf  # noqa: E402
from megaloom.model.gpt import GPT  # noqa: E402

WORDS = [word for subject in make_data.SUBJECTS for word in subject.split()]
LABELS = ["negative", "neutral", "positive"]


def sentence(rng: random.Random, length: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


@dataclass
class Models:
    root: Path
    lm: Path  # megaloom checkpoint (llama flavour: RoPE, RMSNorm, SwiGLU, GQA)
    lm_hf: Path
    classifier: Path  # gpt2 flavour with a 3-label head
    classifier_hf: Path


def build_models(root: Path) -> Models:
    (root / "corpus.txt").write_text(make_data.corpus(600, seed=0))
    tok = train_bpe([root / "corpus.txt"], vocab_size=320, out_path=root / "tokenizer.json",
                    min_frequency=1, show_progress=False)
    torch.manual_seed(0)
    lm_config = ModelConfig(arch="llama", num_layers=2, hidden_size=64, num_heads=4,
                            num_kv_heads=2, seq_len=64, vocab_size=tok.vocab_size,
                            init_std=0.2)
    lm = fit(GPT(lm_config), tok.encode((root / "corpus.txt").read_text()))
    save_model_files(root / "lm", lm, Config(model=lm_config), root / "tokenizer.json")
    export_hf(lm, Config(model=lm_config), root / "lm-hf", root / "tokenizer.json")
    cls_config = ModelConfig(arch="gpt2", num_layers=2, hidden_size=32, num_heads=4, seq_len=64,
                             vocab_size=tok.vocab_size, num_labels=len(LABELS), init_std=0.3)
    classifier = GPT(cls_config)
    config = Config(model=cls_config, task=TaskConfig(name="classify", labels=LABELS))
    save_model_files(root / "cls", classifier, config, root / "tokenizer.json")
    export_hf(classifier, config, root / "cls-hf", root / "tokenizer.json")
    return Models(root, root / "lm", root / "lm-hf", root / "cls", root / "cls-hf")


def fit(model: GPT, ids: list[int], steps: int = 14) -> GPT:
    """A few AdamW steps on the corpus, so greedy predictions are often right (a random model
    would make every argmax check trivially false)."""
    data = torch.tensor(ids)
    seq = model.config.seq_len
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (16,), generator=generator)
        batch = torch.stack([data[i:i + seq + 1] for i in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits[..., :model.config.vocab_size].reshape(-1, model.config.vocab_size),
            batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def documents(count: int = 5, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": make_data.corpus(rng.randint(2, 12), seed + i)} for i in range(count)]


def lambada_records(count: int = 12, seed: int = 2) -> list[dict]:
    return make_data.tasks(count, seed)["cloze"]


def choice_records(count: int = 12, seed: int = 3) -> list[dict]:
    return make_data.tasks(count, seed)["choice"]


def generate_records(count: int = 6, seed: int = 7) -> list[dict]:
    return make_data.tasks(count, seed)["generate"]


def classify_records(count: int = 30, seed: int = 5) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": sentence(rng, rng.randint(3, 15)), "label": rng.choice(LABELS)}
            for _ in range(count)]


def megaloom(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megaloom", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
