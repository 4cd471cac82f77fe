"""lambada, choice and zero-shot classification by label words against log-likelihoods
computed with `transformers` on the exported model (the lm-eval comparison lives in
test_lm_eval.py)."""

import json

import numpy as np
import pytest
import torch
from eval_helpers import LABELS, choice_records, classify_records, lambada_records, write_jsonl
from sklearn.metrics import accuracy_score, f1_score
from transformers import AutoModelForCausalLM, AutoTokenizer

from megaloom.cli import main


@pytest.fixture(scope="module")
def hf(models):
    model = AutoModelForCausalLM.from_pretrained(models.lm_hf).eval()
    return model, AutoTokenizer.from_pretrained(models.lm_hf)


def reference(hf, context, continuation):
    """(summed log-likelihood, greedy) of `continuation` after `context`."""
    model, tokenizer = hf
    context_ids = tokenizer(context)["input_ids"]
    ids = tokenizer(context + continuation)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    targets = torch.tensor(ids[len(context_ids):])
    rows = logprobs[len(context_ids) - 1:-1]
    chosen = rows.gather(-1, targets[:, None])[:, 0]
    return chosen.sum().item(), bool((rows.argmax(-1) == targets).all())


def run(tmp_path, model, task, records, *flags):
    data = write_jsonl(tmp_path / f"{task}.jsonl", records)
    out = tmp_path / f"{task}.json"
    assert main(["evaluate", str(model), "--task", task, "--data", str(data), "--json",
                 str(out), "--batch-size", "5", *flags]) == 0
    return json.loads(out.read_text())


def test_lambada_equals_transformers(tmp_path, models, hf):
    records = lambada_records()
    report = run(tmp_path, models.lm, "lambada", records)
    expected = [reference(hf, r["text"].rsplit(" ", 1)[0], " " + r["text"].rsplit(" ", 1)[1])
                for r in records]
    got = [(s["loglikelihood"], s["greedy"]) for s in report["samples"]]
    assert [g for _, g in got] == [g for _, g in expected]
    np.testing.assert_allclose([ll for ll, _ in got], [ll for ll, _ in expected], atol=1e-4)
    assert report["acc"] == pytest.approx(np.mean([g for _, g in expected]))
    assert report["perplexity"] == pytest.approx(
        np.exp(-np.mean([ll for ll, _ in expected])), rel=1e-4)


def test_choice_equals_transformers(tmp_path, models, hf):
    records = choice_records()
    report = run(tmp_path, models.lm, "choice", records)
    acc, acc_norm = [], []
    for record, sample in zip(records, report["samples"], strict=True):
        lls = np.array([reference(hf, record["context"], " " + c)[0]
                        for c in record["choices"]])
        np.testing.assert_allclose(sample["loglikelihoods"], lls, atol=1e-4)
        lengths = np.array([len(c) for c in record["choices"]])
        acc.append(np.argmax(lls) == record["label"])
        acc_norm.append(np.argmax(lls / lengths) == record["label"])
    assert report["acc"] == pytest.approx(np.mean(acc))
    assert report["acc_norm"] == pytest.approx(np.mean(acc_norm))


def test_truncate_cuts_long_contexts_from_the_left(tmp_path, models, hf):
    long = {"text": " ".join(["the river runs"] * 40) + " past"}
    refused = tmp_path / "refused.json"
    data = write_jsonl(tmp_path / "long.jsonl", [long])
    assert main(["evaluate", str(models.lm), "--task", "lambada", "--data", str(data),
                 "--json", str(refused)]) == 2
    report = run(tmp_path, models.lm, "lambada", [long], "--truncate")
    assert report["truncated"] == 1 and report["documents"] == 1


@pytest.mark.parametrize("words", [None, {"negative": "bad", "neutral": "so", "positive": "good"}])
def test_zero_shot_label_words_equal_transformers(tmp_path, models, hf, words):
    records = classify_records()
    prompt = "Review: {text}\nSentiment:"
    flags = ["--prompt", prompt]
    if words:
        flags += ["--label-words", ",".join(f"{k}={v}" for k, v in words.items())]
    report = run(tmp_path, models.lm, "classify", records, *flags)
    labels = list(words) if words else sorted(LABELS)
    scored = list(words.values()) if words else labels
    true, predicted = [], []
    for record, got in zip(records, report["loglikelihoods"], strict=True):
        context = prompt.replace("{text}", record["text"])
        lls = [reference(hf, context, " " + word)[0] for word in scored]
        np.testing.assert_allclose(got, lls, atol=1e-4)
        true.append(labels.index(record["label"]))
        predicted.append(int(np.argmax(lls)))
    assert report["labels"] == labels
    assert report["predictions"] == [labels[p] for p in predicted]
    assert report["accuracy"] == pytest.approx(accuracy_score(true, predicted))
    assert report["macro"]["f1"] == pytest.approx(
        f1_score(true, predicted, average="macro", labels=range(len(labels)), zero_division=0))
