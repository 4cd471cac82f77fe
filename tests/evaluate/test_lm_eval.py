"""The real lm-evaluation-harness on the example tasks of `examples/lm_eval/`: through a live
`megaloom serve` (`local-completions`, the server's own tokenizer routes, no tokenizer files)
and with `--model hf` on the same weights exported to Hugging Face format. Accuracies are
identical, per-sample log-likelihoods agree within 1e-4, greedy generations are identical, and
`megaloom evaluate` gets lm-eval's numbers on the same data. `local-chat-completions` runs the
generate_until task and returns what the chat route answers for the same messages."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from eval_helpers import EXAMPLES
from server_process import free_port, wait_until_healthy

from megaloom.cli import main

TASKS = ("megaloom_choice", "megaloom_cloze", "megaloom_generate")
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
LM_EVAL = [sys.executable, "-m", "lm_eval"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-eval")
    for yaml in EXAMPLES.glob("*.yaml"):
        shutil.copy(yaml, root)
    subprocess.run([sys.executable, EXAMPLES / "make_data.py", "--out", root / "data",
                    "--count", "16", "--corpus-lines", "10"], check=True, capture_output=True)
    return root


@pytest.fixture(scope="module")
def server(models):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "megaloom", "serve", str(models.lm),
                             "--port", str(port), "--model-name", "toy"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_healthy(proc, url, timeout=120)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def lm_eval(workdir, name, model, model_args, tasks=TASKS, *extra):
    out = workdir / f"out-{name}"
    result = subprocess.run(
        [*LM_EVAL, "--model", model, "--model_args", model_args, "--include_path", workdir,
         "--tasks", ",".join(tasks), "--log_samples", "--output_path", out, *extra],
        cwd=workdir, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl"))
                      .read_text().splitlines()] for task in tasks}
    for rows in samples.values():
        rows.sort(key=lambda row: row["doc_id"])
    return results, samples


@pytest.fixture(scope="module")
def runs(workdir, models, server):
    served = lm_eval(workdir, "serve", "local-completions",
                     f"model=toy,base_url={server}/v1/completions,tokenizer_backend=remote,"
                     "tokenized_requests=True,num_concurrent=1,max_retries=1")
    # logits_cache=False: lm-eval's hf backend groups requests by `context + continuation[:-1]`
    # across tasks, and a cloze item ("my neighbour walks to the long" + " road") with the
    # same tokens as a choice item ("my neighbour walks to" + " the long road") then gets the
    # other's score (lm-eval issue #2984); the served model has no such cache.
    hf = lm_eval(workdir, "hf", "hf",
                 f"pretrained={models.lm_hf},dtype=float32,logits_cache=False", TASKS,
                 "--device", "cpu")
    return served, hf


def loglikelihoods(rows):
    return [[float(r[0]) for r in row["filtered_resps"]] for row in rows]


def greedy_flags(rows):
    return [[r[1] for r in row["filtered_resps"]] for row in rows]


def test_served_model_equals_transformers_in_lm_eval(runs):
    (served, served_samples), (hf, hf_samples) = runs
    for task, metrics in (("megaloom_choice", ("acc,none", "acc_norm,none")),
                          ("megaloom_cloze", ("acc,none",)),
                          ("megaloom_generate", ("exact_match,strip",))):
        for metric in metrics:
            assert served[task][metric] == hf[task][metric], (task, metric)
    assert served["megaloom_cloze"]["perplexity,none"] == pytest.approx(
        hf["megaloom_cloze"]["perplexity,none"], rel=1e-4)
    for task in ("megaloom_choice", "megaloom_cloze"):
        ours, theirs = served_samples[task], hf_samples[task]
        assert greedy_flags(ours) == greedy_flags(theirs)
        np.testing.assert_allclose(np.concatenate(loglikelihoods(ours)),
                                   np.concatenate(loglikelihoods(theirs)), atol=1e-4)
    generations = [row["resps"] for row in served_samples["megaloom_generate"]]
    assert generations == [row["resps"] for row in hf_samples["megaloom_generate"]]
    assert 0 < hf["megaloom_choice"]["acc,none"] < 1  # a model that can be right or wrong


def test_megaloom_evaluate_equals_lm_eval(tmp_path, models, workdir, runs):
    (results, samples), _ = runs
    for task, name, data in (("choice", "megaloom_choice", "choice.jsonl"),
                             ("lambada", "megaloom_cloze", "cloze.jsonl")):
        out = tmp_path / f"{task}.json"
        assert main(["evaluate", str(models.lm), "--task", task, "--data",
                     str(workdir / "data" / data), "--json", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["acc"] == results[name]["acc,none"]
        if task == "choice":
            assert report["acc_norm"] == results[name]["acc_norm,none"]
            ours = [s["loglikelihoods"] for s in report["samples"]]
        else:
            assert report["perplexity"] == pytest.approx(results[name]["perplexity,none"],
                                                         rel=1e-4)
            ours = [[s["loglikelihood"]] for s in report["samples"]]
        np.testing.assert_allclose(np.concatenate(ours),
                                   np.concatenate(loglikelihoods(samples[name])), atol=1e-4)


def test_chat_completions_generate_until(workdir, server):
    _, samples = lm_eval(workdir, "chat", "local-chat-completions",
                         f"model=toy,base_url={server}/v1/chat/completions,num_concurrent=1,"
                         "max_retries=1", ("megaloom_generate",), "--apply_chat_template")
    rows = samples["megaloom_generate"]
    records = [json.loads(line) for line in
               (Path(workdir) / "data" / "generate.jsonl").read_text().splitlines()]
    assert len(rows) == len(records)
    for row, record in zip(rows[:4], records, strict=False):
        answer = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
            "model": "toy", "messages": [{"role": "user", "content": record["prompt"]}],
            "max_tokens": 12, "temperature": 0, "stop": ["\n"]}).json()
        assert row["resps"][0][0] == answer["choices"][0]["message"]["content"]
