"""Log-likelihood the way lm-evaluation-harness asks for it, the tokenizer routes, and
Megatron's `PUT /api`, checked against a direct forward pass of the same token ids."""

from __future__ import annotations

import math

import pytest
import torch

from megaloom.infer import Request, SamplingParams

TEXT = "The fox walks to the quiet sea. A writer remembers a red kite."


def forward_logprobs(loaded, ids):
    """log-softmax of a plain forward pass: row t scores token t + 1."""
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids]))[0, :, : loaded.tokenizer.vocab_size]
    return torch.log_softmax(logits.double(), dim=-1)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_logprobs_equal_a_forward_pass(client, loaded, max_tokens):
    ids = loaded.tokenizer.encode(TEXT)
    body = {"prompt": ids, "max_tokens": max_tokens, "logprobs": 1, "echo": True,
            "temperature": 0, "seed": 1234}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) + max_tokens
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert choice["text"].startswith(loaded.tokenizer.decode(ids))
    reference = forward_logprobs(loaded, ids)
    expected = [reference[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    assert lp["token_logprobs"][1: len(ids)] == pytest.approx(expected, abs=1e-4)
    assert sum(lp["token_logprobs"][1: len(ids)]) == pytest.approx(sum(expected), abs=1e-3)
    for t in range(1, len(ids)):
        best = reference[t - 1].argmax().item()
        top = lp["top_logprobs"][t]
        assert loaded.tokenizer.decode([best]) in top
        assert max(top.values()) == pytest.approx(reference[t - 1].max().item(), abs=1e-4)
    if max_tokens == 1:  # greedy: the generated token is the argmax after the prompt
        last = reference[-1]
        assert lp["token_logprobs"][-1] == pytest.approx(last.max().item(), abs=1e-4)
        assert choice["finish_reason"] == "length"


def test_completion_logprobs_report_alternatives(client, loaded):
    r = client.post("/v1/completions", json={"prompt": "The river", "max_tokens": 5,
                                             "logprobs": 3, "temperature": 0})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 5
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"],
                                   strict=True):
        assert token in top and top[token] == pytest.approx(logprob)
        assert logprob == pytest.approx(max(top.values()))  # greedy picks the best
        assert 1 <= len(top) <= 4
    offsets = lp["text_offset"]
    assert offsets[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], lp["tokens"], strict=False))


def test_tokenizer_routes(client, loaded):
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == loaded.tokenizer.eod_token
    assert info["model_max_length"] == 128
    r = client.post("/tokenize", json={"prompt": TEXT + info["eos_token"]}).json()
    assert r["tokens"] == loaded.tokenizer.encode(TEXT) + [loaded.tokenizer.eod_id]
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 128
    back = client.post("/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == TEXT + info["eos_token"]
    bad = client.post("/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_megatron_api_generates_like_the_engine(client, loaded):
    body = {"prompts": ["The fox", "A writer dreams"], "tokens_to_generate": 8,
            "top_k": 1, "random_seed": 7}
    r = client.put("/api", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"text", "segments"}
    for prompt, text, segments in zip(body["prompts"], out["text"], out["segments"],
                                      strict=True):
        expected = loaded.engine(1).generate([Request(prompt, SamplingParams(
            max_tokens=8, top_k=1, seed=7))])[0]
        assert text == prompt + expected.completions[0].text
        ids = expected.prompt_token_ids + expected.completions[0].token_ids
        assert segments == [loaded.tokenizer.decode([t]) for t in ids]


def test_megatron_api_logprobs_score_the_prompt(client, loaded):
    r = client.put("/api", json={"prompts": [TEXT], "tokens_to_generate": 0,
                                 "logprobs": True})
    assert r.status_code == 200, r.text
    ids = loaded.tokenizer.encode(TEXT)
    reference = forward_logprobs(loaded, ids)
    expected = [reference[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    assert r.json()["logprobs"][0] == pytest.approx(expected, abs=1e-4)
    assert r.json()["text"] == [TEXT]


def test_megatron_stop_token_and_bos(client, loaded):
    expected = loaded.engine(1).generate([Request("The fox", SamplingParams(
        max_tokens=10, temperature=0.0, ignore_eos=True))])[0]
    ids = expected.prompt_token_ids + expected.completions[0].token_ids
    stop_id = expected.completions[0].token_ids[2]
    stopped = client.put("/api", json={"prompts": ["The fox"], "tokens_to_generate": 10,
                                       "top_k": 1, "stop_token": stop_id}).json()
    until = len(expected.prompt_token_ids) + expected.completions[0].token_ids.index(stop_id)
    assert stopped["segments"][0] == [loaded.tokenizer.decode([t]) for t in ids[: until + 1]]
    with_bos = client.put("/api", json={"prompts": ["The fox"], "tokens_to_generate": 1,
                                        "top_k": 1, "add_BOS": True}).json()
    assert with_bos["segments"][0][0] == loaded.tokenizer.eod_token


def test_metrics_count_requests_and_tokens(client):
    client.post("/v1/completions", json={"prompt": "The fox", "max_tokens": 4,
                                         "temperature": 0})
    client.post("/v1/completions", json={"prompt": "The fox", "top_p": 1.5})
    text = client.get("/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['megaloom_requests_total{route="/v1/completions",status="200"}'] >= 1
    assert values['megaloom_requests_total{route="/v1/completions",status="400"}'] >= 1
    assert values["megaloom_generation_tokens_total"] >= 4
    assert values["megaloom_prompt_tokens_total"] >= 2
    assert values["megaloom_time_to_first_token_seconds_count"] >= 1
    assert values["megaloom_request_latency_seconds_count"] >= 1
    for gauge in ("megaloom_queue_depth", "megaloom_running_batch_size"):
        assert gauge in values
    assert not math.isnan(values["megaloom_request_latency_seconds_sum"])
