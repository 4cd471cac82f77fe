"""`megaloom finetune` end to end, and bad input: one clear line, exit status 2, nothing
written."""

import json

import pytest
from finetune_helpers import write_jsonl

from megaloom.cli import main

FAST = ["train.micro_batch_size=2", "train.global_batch_size=4", "task.epochs=1"]


def finetune(workdir, out, task, data, valid=None, *overrides):
    args = ["finetune", str(workdir / "base-gpt2"), "--task", task, "--data", str(data),
            "--out", str(out), *FAST, *overrides]
    if valid is not None:
        args += ["--valid", str(valid)]
    return main(args)


def test_classify_run_reports_sklearn_metrics_and_a_confusion_plot(workdir, tmp_path, capsys):
    out = tmp_path / "cls"
    assert finetune(workdir, out, "classify", workdir / "cls.jsonl",
                    workdir / "cls_valid.jsonl") == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["labels"] == ["green", "river", "stone"]
    assert sum(map(sum, report["confusion_matrix"])) == report["samples"] == 8
    assert 0.0 <= report["accuracy"] <= 1.0 and set(report["per_class"]) == set(report["labels"])
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "accuracy" in capsys.readouterr().out


def test_sft_run_reports_loss_and_rouge(workdir, tmp_path):
    out = tmp_path / "sft"
    assert finetune(workdir, out, "sft", workdir / "sft.jsonl", workdir / "sft_valid.jsonl",
                    "task.eval_samples=2", "task.max_new_tokens=4", "task.lora.rank=2") == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["rouge"]["samples"] == 2 and len(report["generations"]) == 2
    assert report["loss"] > 0 and report["trained_tokens"] > 0


BAD = {
    "missing field": ([{"prompt": "a"}], "sft", "missing field 'response'"),
    "empty response": ([{"prompt": "a", "response": "  "}], "sft", "'response' is empty"),
    "one class": ([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}], "classify",
                  "only one class"),
    "no chat template": ([{"messages": [{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": "yo"}]}], "sft",
                         "has no chat template"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_training_data_is_one_line_and_writes_nothing(workdir, tmp_path, capsys, case):
    records, task, message = BAD[case]
    data = tmp_path / "data.jsonl"
    write_jsonl(data, records)
    extra = ["task.template=tokenizer"] if case == "no chat template" else []
    assert finetune(workdir, tmp_path / "out", task, data, None, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    if case in ("missing field", "empty response"):
        assert "data.jsonl:1:" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unseen_validation_label_and_non_jsonl_files(workdir, tmp_path, capsys):
    valid = tmp_path / "valid.jsonl"
    write_jsonl(valid, [{"text": "alpha", "label": "green"}, {"text": "beta", "label": "sky"}])
    assert finetune(workdir, tmp_path / "out", "classify", workdir / "cls.jsonl", valid) == 2
    assert "valid.jsonl:2: label 'sky' never occurs in the training data" in \
        capsys.readouterr().err
    text = tmp_path / "notes.jsonl"
    text.write_text('{"prompt": "a", "response": "b"}\nthis is not json\n')
    assert finetune(workdir, tmp_path / "out", "sft", text) == 2
    assert "notes.jsonl:2: not JSONL" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bert_classifier_finetunes_through_the_pooler_and_matches_transformers(workdir,
                                                                               tmp_path):
    """A masked-LM BERT base gets a fresh pooler and head; `megaloom evaluate` scores the
    result as fine-tuning did, and the exported `BertForSequenceClassification` predicts the
    same logits on `[CLS] text [SEP]` with padding."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from megaloom.data.tokenizer import Tokenizer
    from megaloom.loading import load_model

    out = tmp_path / "cls"
    args = ["finetune", str(workdir / "base-bert"), "--task", "classify", "--data",
            str(workdir / "cls.jsonl"), "--valid", str(workdir / "cls_valid.jsonl"),
            "--out", str(out), *FAST, "task.epochs=4", "train.lr=3e-3"]
    assert main(args) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["labels"] == ["green", "river", "stone"] and report["samples"] == 8
    scored = tmp_path / "scored.json"
    assert main(["evaluate", str(out), "--task", "classify", "--data",
                 str(workdir / "cls_valid.jsonl"), "--json", str(scored)]) == 0
    evaluated = json.loads(scored.read_text())
    assert evaluated["accuracy"] == report["accuracy"]
    assert "pooled [CLS]" in evaluated["protocol"]
    assert main(["convert", "megaloom-to-hf", str(out), str(tmp_path / "hf")]) == 0
    reference = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    model, config, tokenizer_path = load_model(out)
    tokenizer = Tokenizer.from_file(tokenizer_path)
    cls, sep = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]"))
    rows = [[cls, *tokenizer.encode(text), sep] for text in ("green stone", "a river of words")]
    ids = torch.full((2, max(map(len, rows))), sep)
    attend = torch.zeros(ids.shape, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], attend[i, :len(row)] = torch.tensor(row), True
    with torch.no_grad():
        ours = model(ids, attn_mask=attend[:, None, None, :])
        theirs = reference(input_ids=ids, attention_mask=attend.long()).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
