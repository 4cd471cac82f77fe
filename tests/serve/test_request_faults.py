"""Requests that used to break the server: a top_k above the vocabulary, lone surrogates, and
an engine step that raises. Each fails alone (or is served), and the server goes on."""

from __future__ import annotations

import json

import pytest

from megaloom.infer import Engine, Request, SamplingParams


def test_top_k_above_the_vocabulary_keeps_every_token(client, loaded):
    body = {"prompt": "the quiet", "max_tokens": 6, "temperature": 0.8, "seed": 5}
    unfiltered = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    wide = client.post("/v1/completions", json={**body, "top_k": 5000})
    assert wide.status_code == 200 and wide.json()["choices"][0]["text"] == unfiltered
    assert client.get("/health").status_code == 200


def test_engine_bounds_top_k_and_logprobs(loaded):
    engine = loaded.engine()
    vocab = engine.vocab_size
    out = engine.generate([Request("the", SamplingParams(max_tokens=3, top_k=10**6, seed=1))])
    reference = engine.generate([Request("the", SamplingParams(max_tokens=3, seed=1))])
    assert out[0].completions[0].token_ids == reference[0].completions[0].token_ids
    with pytest.raises(Exception, match="vocabulary size"):
        engine.add_request(Request("the", SamplingParams(logprobs=vocab + 1)))
    with pytest.raises(Exception, match="seed"):
        engine.add_request(Request("the", SamplingParams(seed=10**24)))


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 2}),
    ("/v1/completions", {"prompt": "ab", "max_tokens": 2, "stop": ["\udfff"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]}),
    ("/tokenize", {"prompt": "a\ud800b"}),
    ("/api", {"prompts": ["a\ud800b"]}),
])
def test_lone_surrogate_is_a_400_and_the_connection_survives(client, route, body):
    method = client.put if route == "/api" else client.post
    answer = method(route, content=json.dumps(body), headers={"content-type":
                                                              "application/json"})
    assert answer.status_code == 400, answer.text
    assert "surrogate" in answer.json()["error"]["message"]
    assert client.post("/tokenize", json={"prompt": "ok"}).status_code == 200  # same client


class FailingOnce(Engine):
    """An engine whose next step raises once (a bug or a device fault in one batch)."""

    fail_next = False

    def step(self):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("simulated fault")
        return super().step()


def test_a_failed_step_fails_its_batch_and_serving_goes_on(loaded, make_server):
    engine = FailingOnce(loaded.model, loaded.tokenizer, max_batch_size=4)
    with make_server(engine) as live, live.client() as client:
        engine.fail_next = True
        failed = client.post("/v1/completions", json={"prompt": "the", "max_tokens": 4})
        assert failed.status_code == 500 and "simulated fault" in failed.json()["error"][
            "message"]
        assert client.get("/health").status_code == 200
        ok = client.post("/v1/completions", json={"prompt": "the", "max_tokens": 4})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_seeded_sampling_is_reproducible_alone_and_under_load(server):
    """A finished draft's `id()` used to key the engine's cached sampler, so a new draft
    allocated at the same address sampled with the old one's generator and filters."""
    from concurrent.futures import ThreadPoolExecutor

    body = {"prompt": "the quiet", "max_tokens": 8, "temperature": 0.8, "top_p": 0.9,
            "seed": 2}
    others = [{"prompt": p, "max_tokens": 8, "temperature": 1.0, "top_k": 20}
              for p in ("a small cat", "the river remembers", "my")]

    def text(payload):
        with server.client() as client:
            return client.post("/v1/completions", json=payload).json()["choices"][0]["text"]

    alone = [text(body) for _ in range(30)]
    assert set(alone) == {alone[0]}
    with ThreadPoolExecutor(8) as pool:
        mixed = list(pool.map(text, [body if i % 2 else others[i % 3] for i in range(120)]))
    assert {t for i, t in enumerate(mixed) if i % 2} == {alone[0]}


def test_a_new_draft_never_reuses_a_finished_drafts_sampler(loaded):
    engine = loaded.engine()
    params = SamplingParams(max_tokens=4, temperature=0.8, seed=2)
    first = engine.generate([Request("the", params)])[0].completions[0].token_ids
    for _ in range(20):
        stale = engine._sampler
        again = engine.generate([Request("the", params)])[0].completions[0].token_ids
        assert engine._sampler is not stale and again == first


def test_tokenizer_info_names_the_special_tokens_the_export_writes(client, loaded, tmp_path):
    """One source for special tokens: `/tokenizer_info` and `megaloom convert`'s
    tokenizer_config.json agree."""
    from megaloom.interop.tokenizer_files import write_tokenizer_files

    info = client.get("/tokenizer_info").json()
    write_tokenizer_files(loaded.tokenizer_path, tmp_path, 128)
    written = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert info["bos_token"] == written["bos_token"] == "<|endoftext|>"
    assert info["eos_token"] == written["eos_token"]
