"""The whole single-process workflow through the CLI: tokenizer -> preprocess -> train ->
checkpoint -> resume -> generate, plus the CLI's handling of bad input."""

import json

import pytest
import torch

from megaloom.cli import main
from megaloom.train.metrics import read_metrics

SENTENCES = [
    "The loom weaves threads of text into cloth.",
    "A tokenizer splits words into pieces.",
    "Python reads the documentation aloud.",
    "Models learn to predict the next token.",
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    corpus = root / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(300):
            text = " ".join(SENTENCES[(i + k) % 4] for k in range(1 + i % 4))
            f.write(json.dumps({"text": text}) + "\n")
    tok = root / "tok.json"
    assert main(["tokenizer", "train", "--vocab-size", "320", "--output", str(tok),
                 str(corpus)]) == 0
    assert main(["preprocess", "--input", str(corpus), "--output-prefix", str(root / "c"),
                 "--tokenizer", str(tok), "--append-eod", "--no-progress"]) == 0
    return root, tok, str(root / "c_text_document")


def train_args(prepared, out, *extra):
    root, tok, prefix = prepared
    return ["train", "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
            "model.seq_len=32", "model.dropout=0.1", "train.max_steps=6",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_interval=3",
            "train.eval_iters=2", "train.warmup_steps=2", "train.save_interval=100",
            f"data.prefixes=[{prefix}]", f"data.tokenizer={tok}",
            f"data.cache_dir={root / 'cache'}", "--out", str(out), "--samples", "0", *extra]


def test_train_resume_generate(prepared, tmp_path, capsys):
    assert main(train_args(prepared, tmp_path / "straight")) == 0
    assert main(train_args(prepared, tmp_path / "resumed", "train.exit_at_step=3")) == 0
    assert main(train_args(prepared, tmp_path / "resumed")) == 0  # resumes by default
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]
    assert [r["val_loss"] for r in straight if "val_loss" in r] == [
        r["val_loss"] for r in resumed if "val_loss" in r]
    for name in ("config.yaml", "loss.png", "metrics.jsonl"):
        assert (tmp_path / "resumed" / name).is_file()
    out = tmp_path / "generated.jsonl"
    assert main(["generate", str(tmp_path / "resumed"), "The loom", "--max-tokens", "8",
                 "--greedy", "--ignore-eos", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["completion_tokens"] == 8
    assert record["completion"] == greedy_by_full_forward(tmp_path / "resumed", "The loom", 8)


def greedy_by_full_forward(run, prompt, count):
    """The reference: argmax of a plain forward over the whole sequence, token by token."""
    from megaloom.data.tokenizer import Tokenizer
    from megaloom.loading import load_model

    model, config, tokenizer_path = load_model(run)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    ids = tokenizer.encode(prompt)
    start = len(ids)
    with torch.no_grad():
        for _ in range(count):
            logits = model(torch.tensor([ids]))[0, -1, : config.model.vocab_size]
            ids.append(int(logits.argmax()))
    return tokenizer.decode(ids[start:])


def test_cli_errors_are_one_line(prepared, tmp_path, capsys):
    assert main(["train", "model.num_layer=2"]) == 2
    assert "did you mean 'model.num_layers'" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "missing"), "hi"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_corrupted_checkpoint_stops_resume_and_keeps_files(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(prepared, out, "train.exit_at_step=3")) == 0
    weights = out / "checkpoints" / "step_00000003" / "shard_00000.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")
    damaged = weights.read_bytes()
    capsys.readouterr()
    assert main(train_args(prepared, out)) == 2
    assert "corrupted" in capsys.readouterr().err
    assert weights.read_bytes() == damaged  # nothing overwritten
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000003"]


def test_distil_a_smaller_student_through_the_cli(prepared, tmp_path, capsys):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    assert main(train_args(prepared, teacher)) == 0
    capsys.readouterr()
    assert main(train_args(prepared, tmp_path / "bad", "task.name=distill")) == 2
    assert "task.distill.teacher: is required" in capsys.readouterr().err
    assert main(train_args(prepared, student, "model.num_layers=1", "task.name=distill",
                           f"task.distill.teacher={teacher}",
                           "task.distill.temperature=2")) == 0
    metrics = read_metrics(student / "metrics.jsonl")
    assert len(metrics) == 6 and metrics[-1]["loss"] < metrics[0]["loss"]
    from megaloom.loading import load_model

    model, config, _ = load_model(student)
    assert config.model.num_layers == 1 and config.task.distill.temperature == 2.0
    assert main(["generate", str(student), "The loom", "--max-tokens", "4", "--greedy"]) == 0
