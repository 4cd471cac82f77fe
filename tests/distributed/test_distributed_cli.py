"""`megaloom train --nproc 2` launches torchrun and matches the single-process run, both data
parallel (samples sharded, distributed optimizer) and pipelined (validation through the stages);
a layout that does not fit the world size is a one-line error."""

import json

import pytest

from megaloom.cli import main
from megaloom.train.metrics import read_metrics

SENTENCES = ["The loom weaves threads of text into cloth.", "Models predict the next token.",
             "A tokenizer splits words into pieces.", "Python reads the documentation."]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(SENTENCES[(i + k) % 4]
                                                          for k in range(1 + i % 4))}) + "\n"
                              for i in range(200)), encoding="utf-8")
    tok = root / "tok.json"
    assert main(["tokenizer", "train", "--vocab-size", "300", "--output", str(tok),
                 str(corpus)]) == 0
    assert main(["preprocess", "--input", str(corpus), "--output-prefix", str(root / "c"),
                 "--tokenizer", str(tok), "--append-eod", "--no-progress"]) == 0
    return root, tok


def train_args(data, out, *extra):
    root, tok = data
    return ["train", "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4",
            "model.seq_len=16", "train.max_steps=3", "train.micro_batch_size=2",
            "train.global_batch_size=4", "train.eval_interval=3", "train.eval_iters=2",
            "train.warmup_steps=1", "train.precision=fp32",
            f"data.prefixes=[{root / 'c_text_document'}]", f"data.tokenizer={tok}",
            f"data.cache_dir={root / 'cache'}", "--out", str(out), "--samples", "0", *extra]


@pytest.mark.parametrize("layout", ["parallel.distributed_optimizer=true", "parallel.pp=2"])
def test_nproc_run_matches_single_process(data, tmp_path, layout):
    assert main(train_args(data, tmp_path / "one")) == 0
    assert main(train_args(data, tmp_path / "two", layout, "--nproc", "2")) == 0
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert ("val_loss" in a) == ("val_loss" in b)
        if "val_loss" in a:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
    assert (tmp_path / "two" / "checkpoints" / "step_00000003" / "model.safetensors").is_file()


def test_layout_larger_than_world_is_a_clear_error(data, tmp_path, capsys):
    assert main(train_args(data, tmp_path / "bad", "parallel.tp=2")) != 0
    err = capsys.readouterr().err
    assert "parallel.tp" in err and "Traceback" not in err
