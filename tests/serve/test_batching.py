"""Continuous batching under load and the driver's guarantees: every response equals the
engine's answer to that request alone; a full queue answers 429 (not a hang); timeouts,
disconnects and shutdown cancel or finish generations as promised; a dead engine shows in
/health."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import httpx
import pytest

from megaloom.infer import Request, SamplingParams


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def make_specs(tokenizer, count: int, seed: int = 0) -> list[dict]:
    """Distinct requests: mixed prompt forms and lengths, output lengths and sampling."""
    rng = random.Random(seed)
    words = ["the", "fox", "walks", "to", "a", "quiet", "sea", "writer", "dreams", "of", "an",
             "empty", "house", "red", "kite"]
    specs = []
    for i in range(count):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25))).capitalize()
        body = {"prompt": text if i % 3 else tokenizer.encode(text),
                "max_tokens": rng.randint(1, 24)}
        kind = i % 4
        if kind == 0:
            body["temperature"] = 0
        elif kind == 1:
            body.update(temperature=0.8, seed=rng.randint(0, 10**6), n=2)
        elif kind == 2:
            body.update(temperature=1.0, top_k=rng.choice([5, 50]), top_p=0.9,
                        seed=rng.randint(0, 10**6))
        else:
            body.update(temperature=0, stop=[rng.choice(["e", " t", "a "])])
        body["stream"] = i % 5 == 0
        specs.append(body)
    return specs


def engine_alone(loaded, body) -> list[tuple[str, int, str]]:
    params = SamplingParams(max_tokens=body["max_tokens"], temperature=body["temperature"],
                            top_k=body.get("top_k", 0), top_p=body.get("top_p", 1.0),
                            n=body.get("n", 1), seed=body.get("seed"),
                            stop=body.get("stop", []))
    output = loaded.engine(1).generate([Request(body["prompt"], params)])[0]
    return [(c.text, len(c.token_ids), c.finish_reason) for c in output.completions]


async def call(client: httpx.AsyncClient, body: dict) -> list[tuple[str, int, str]]:
    """(text, completion tokens, finish reason) per choice, streamed or not."""
    if not body["stream"]:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["usage"]["completion_tokens"] is not None
        counts = [None] * len(data["choices"])
        return [(c["text"], counts[i], c["finish_reason"])
                for i, c in enumerate(data["choices"])]
    texts, reasons = {}, {}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line[6:])
        assert "error" not in chunk, chunk
        for c in chunk["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            reasons[c["index"]] = c["finish_reason"] or reasons.get(c["index"])
    return [(texts[i], None, reasons[i]) for i in sorted(texts)]


def test_load_200_requests_32_concurrent_match_the_engine_alone(make_server, loaded):
    specs = make_specs(loaded.tokenizer, 50)
    expected = [engine_alone(loaded, body) for body in specs]
    order = [i % len(specs) for i in range(200)]
    random.Random(1).shuffle(order)

    async def run(url: str) -> list:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            gate = asyncio.Semaphore(32)

            async def one(i: int):
                async with gate:
                    return await call(client, specs[i])

            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in order)), 120)

    with make_server(engine=loaded.engine(8), max_queue=128) as live:
        started = time.monotonic()
        results = asyncio.run(run(live.url))
        elapsed = time.monotonic() - started
        with live.client() as c:
            assert metric(c, 'megaloom_requests_total{route="/v1/completions",status="200"}') \
                == 200
    assert elapsed < 120
    for i, result in zip(order, results, strict=True):
        want = expected[i]
        assert [(t, r) for t, _, r in result] == [(t, r) for t, _, r in want], specs[i]


def test_full_queue_answers_429_with_retry_after(make_server, slow_engine):
    with make_server(engine=slow_engine(max_batch_size=1, delay=0.05), max_queue=2) as live:
        async def burst():
            async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
                body = {"prompt": "The fox", "max_tokens": 6, "temperature": 0,
                        "ignore_eos": True}
                return await asyncio.gather(*(client.post("/v1/completions", json=body)
                                              for _ in range(8)))

        responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 3 and statuses.count(429) == 5, statuses
    for r in responses:
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == 6


def test_timeout_cancels_the_generation(make_server, slow_engine):
    engine = slow_engine(max_batch_size=2, delay=0.05)
    with make_server(engine=engine, timeout=0.3) as live, live.client() as c:
        body = {"prompt": "The fox", "max_tokens": 60, "ignore_eos": True}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            assert s.status_code == 200
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "timeout"
        assert wait_until(lambda: not engine.has_unfinished(), 2.0)
        assert metric(c, 'megaloom_sequences_finished_total{reason="cancelled"}') == 2


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_the_generation(make_server, slow_engine, stream):
    engine = slow_engine(max_batch_size=2, delay=0.03)
    body = {"prompt": "The fox", "max_tokens": 100, "ignore_eos": True, "stream": stream}
    with make_server(engine=engine) as live:
        if stream:
            with live.client() as c, c.stream("POST", "/v1/completions", json=body) as s:
                next(s.iter_lines())  # the generation is running; now hang up
        else:
            with live.client(timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json=body)
        # 100 tokens take >= 3 s; a cancelled request leaves the batch within a few steps.
        assert wait_until(lambda: not engine.has_unfinished(), 1.5)
        with live.client() as c:
            assert metric(c, 'megaloom_sequences_finished_total{reason="cancelled"}') == 1
            assert metric(c, "megaloom_generation_tokens_total") < 60


def test_shutdown_finishes_in_flight_requests(make_server, slow_engine):
    engine = slow_engine(max_batch_size=2, delay=0.02)
    results = {}
    with make_server(engine=engine) as live:
        def ask():
            with live.client() as c:
                results["r"] = c.post("/v1/completions", json={
                    "prompt": "The fox", "max_tokens": 40, "ignore_eos": True,
                    "temperature": 0})

        thread = threading.Thread(target=ask)
        thread.start()
        assert wait_until(engine.has_unfinished, 5.0)
        live.server.should_exit = True  # what SIGTERM / Ctrl-C does
        thread.join(timeout=30)
    r = results["r"]
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
    assert r.json()["choices"][0]["finish_reason"] == "length"
