"""Perplexity protocols against the same loops written with `transformers` on the exported
Hugging Face model (tokenised by its own tokenizer), and the windowing rules in closed form."""

import json
import math
import random

import pytest
import torch
from eval_helpers import documents, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from megaloom.cli import main
from megaloom.evaluate.perplexity import JOINER, chunk_windows, strided_windows


def evaluate(tmp_path, model, data, *flags):
    out = tmp_path / "report.json"
    assert main(["evaluate", str(model), "--data", str(data), "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("seed", range(20))
def test_strided_windows_score_every_target_once(seed):
    rng = random.Random(seed)
    n, length = rng.randint(2, 300), rng.randint(2, 64)
    stride = rng.randint(1, length - 1)
    windows = strided_windows(list(range(n)), length, stride)
    scored = [t for w in windows for t in w.tokens[-w.scored:]]
    assert scored == list(range(1, n))  # every target once, in order; token 0 is context
    assert all(len(w.tokens) <= length for w in windows)


def test_chunks_drop_the_tail():
    windows = chunk_windows(list(range(23)), 5)
    assert [list(w.tokens) for w in windows] == [list(range(i, i + 5)) for i in (0, 5, 10, 15)]
    assert all(w.scored == 4 for w in windows)


def hf_window_nll(model, ids, begin, end, scored):
    """Summed NLL of the last `scored` targets of ids[begin:end], as the HF guide computes."""
    inputs = torch.tensor([ids[begin:end]])
    labels = inputs.clone()
    labels[:, :-scored] = -100
    with torch.no_grad():
        loss = model(inputs, labels=labels).loss.item()
    return loss * scored


def hf_strided(model, ids, length, stride):
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + length, len(ids))
        scored = min(end - previous_end, end - begin - 1)
        total += hf_window_nll(model, ids, begin, end, scored)
        count += scored
        previous_end = end
        if end == len(ids):
            break
    return total, count


@pytest.fixture(scope="module")
def hf(models):
    model = AutoModelForCausalLM.from_pretrained(models.lm_hf).eval()
    return model, AutoTokenizer.from_pretrained(models.lm_hf)


@pytest.mark.parametrize("length,stride", [(64, 32), (40, 7), (65, 64)])
def test_strided_equals_transformers_loop(tmp_path, models, hf, length, stride):
    model, tokenizer = hf
    docs = documents()
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    report = evaluate(tmp_path, models.lm, data, "--task", "perplexity", "--max-length",
                      str(length), "--stride", str(stride), "--batch-size", "3")
    total, count = 0.0, 0
    for doc in docs:
        ids = [tokenizer.eos_token_id, *tokenizer(doc["text"])["input_ids"]]
        nll, n = hf_strided(model, ids, length, stride)
        total, count = total + nll, count + n
    assert report["tokens_scored"] == count
    assert report["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    words = sum(len(d["text"].split()) for d in docs)
    text_bytes = sum(len(d["text"].encode()) for d in docs)
    assert report["word_perplexity"] == pytest.approx(math.exp(total / words), rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(total / text_bytes / math.log(2), rel=1e-5)


def test_chunks_equal_transformers_loop(tmp_path, models, hf):
    model, tokenizer = hf
    docs = documents(8)
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    report = evaluate(tmp_path, models.lm, data, "--task", "perplexity", "--protocol",
                      "chunks", "--max-length", "48")
    ids = tokenizer(JOINER.join(d["text"] for d in docs))["input_ids"]
    losses = [hf_window_nll(model, ids, i, i + 48, 47) / 47
              for i in range(0, len(ids) - 47, 48)]  # SparseGPT: mean of chunk losses
    assert report["windows"] == len(ids) // 48 == len(losses)
    assert report["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_megatron_word_adjusted_perplexity(tmp_path, models, hf):
    model, tokenizer = hf
    docs = documents(4)
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    report = evaluate(tmp_path, models.lm, data, "--task", "perplexity", "--protocol",
                      "megatron", "--max-length", "64", "--stride", "16")
    text = JOINER.join(d["text"] for d in docs)
    ids = tokenizer(text)["input_ids"]
    total, count = hf_strided(model, ids, 64, 16)
    assert count == len(ids) - 1
    loss = total / count
    assert report["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    words = len(text.strip().split(" "))
    assert report["adjusted_perplexity"] == pytest.approx(
        math.exp(loss * (len(ids) - 1) / (words - 1)), rel=1e-5)


def test_text_file_is_one_document(tmp_path, models):
    docs = documents(3)
    (tmp_path / "corpus.txt").write_text(docs[0]["text"])
    one = evaluate(tmp_path, models.lm, tmp_path / "corpus.txt", "--task", "perplexity")
    same = evaluate(tmp_path, models.lm, write_jsonl(tmp_path / "d.jsonl", docs[:1]),
                    "--task", "perplexity")
    assert one["documents"] == 1 and one["perplexity"] == pytest.approx(same["perplexity"])
