"""The generate task against `rouge-score` and `sacrebleu` called directly on the saved
generations, and the classify task against scikit-learn on the exported Hugging Face
classifier's own predictions."""

import json

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from eval_helpers import LABELS, classify_records, generate_records, write_jsonl
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from megaloom.cli import main
from megaloom.evaluate.metrics import bootstrap_interval, split_sentences


def test_generate_rouge_equals_rouge_score(tmp_path, models):
    records = generate_records()
    data = write_jsonl(tmp_path / "gen.jsonl", records)
    out, saved, db = tmp_path / "gen.json", tmp_path / "gens.jsonl", tmp_path / "gen.db"
    assert main(["evaluate", str(models.lm), "--task", "generate", "--data", str(data),
                 "--json", str(out), "--output", str(saved), "--db", f"sqlite:///{db}",
                 "--max-tokens", "12", "--temperature", "0.9", "--seed", "3", "--bleu",
                 "--bootstrap", "200"]) == 0
    report = json.loads(out.read_text())
    rows = [json.loads(line) for line in saved.read_text().splitlines()]
    assert [r["reference"] for r in rows] == [r["reference"] for r in records]
    generations = [r["completion"].strip() for r in rows]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
                                      use_stemmer=True)
    scores = [scorer.score(split_sentences(r["reference"]), split_sentences(g))
              for r, g in zip(records, generations, strict=True)]
    for kind in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        for field, index in (("precision", 0), ("recall", 1), ("f1", 2)):
            assert report["rouge"][kind][field] == pytest.approx(
                np.mean([s[kind][index] for s in scores]))
        low, high = report["rouge"][kind]["f1_ci95"]
        assert low <= report["rouge"][kind]["f1"] <= high
        assert [r["scores"][kind] for r in rows] == pytest.approx(
            [s[kind].fmeasure for s in scores])
    bleu = BLEU().corpus_score(generations, [[r["reference"] for r in records]])
    assert report["bleu"]["score"] == pytest.approx(bleu.score)
    with sa.create_engine(f"sqlite:///{db}").connect() as conn:
        assert conn.execute(sa.text("select count(*) from generation_scores")).scalar() == 6
        stored = conn.execute(sa.text("select report from evaluations")).scalar()
    assert json.loads(stored)["rouge"]["rouge1"] == report["rouge"]["rouge1"]


def test_bootstrap_is_seeded():
    values = np.random.default_rng(0).random(50)
    assert bootstrap_interval(values, 500, 1) == bootstrap_interval(values, 500, 1)
    assert bootstrap_interval(values, 500, 1) != bootstrap_interval(values, 500, 2)
    low, high = bootstrap_interval(values, 500, 1)
    assert low < values.mean() < high


def test_unicode_tokenizer_scores_non_ascii(tmp_path):
    from megaloom.evaluate.metrics import rouge

    assert rouge(["привет мир"], ["привет мир"])["rouge1"]["f1"] == 0.0  # rouge-score default
    assert rouge(["привет мир"], ["привет мир"], tokenizer="unicode")["rouge1"]["f1"] == 1.0


def test_classify_equals_scikit_learn_on_transformers_predictions(tmp_path, models):
    records = classify_records()
    data = write_jsonl(tmp_path / "cls.jsonl", records)
    out = tmp_path / "cls.json"
    assert main(["evaluate", str(models.classifier), "--task", "classify", "--data", str(data),
                 "--json", str(out), "--batch-size", "4"]) == 0
    report = json.loads(out.read_text())
    assert (tmp_path / "cls.confusion.png").stat().st_size > 0
    hf = AutoModelForSequenceClassification.from_pretrained(models.classifier_hf).eval()
    tokenizer = AutoTokenizer.from_pretrained(models.classifier_hf)
    with torch.no_grad():
        predicted = [hf(**tokenizer(r["text"], return_tensors="pt")).logits.argmax(-1).item()
                     for r in records]
    true = [LABELS.index(r["label"]) for r in records]
    assert report["predictions"] == [hf.config.id2label[p] for p in predicted]
    assert report["accuracy"] == pytest.approx(accuracy_score(true, predicted))
    assert report["confusion_matrix"] == confusion_matrix(true, predicted, labels=[0, 1, 2]
                                                          ).tolist()
    for average in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(true, predicted, average=average,
                                                     labels=[0, 1, 2], zero_division=0)
        assert (report[average]["precision"], report[average]["recall"],
                report[average]["f1"]) == pytest.approx((p, r, f))
    per_class = precision_recall_fscore_support(true, predicted, labels=[0, 1, 2],
                                                zero_division=0)
    for i, label in enumerate(LABELS):
        assert report["per_class"][label]["f1"] == pytest.approx(per_class[2][i])
