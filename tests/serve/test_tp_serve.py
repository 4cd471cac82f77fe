"""`megaloom serve --nproc 2`: a live tensor-parallel server (torchrun, gloo) answers
completions exactly as the single-process engine generates them, and stops on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
from server_process import free_port, wait_until_healthy

from megaloom.data.tokenizer import Tokenizer
from megaloom.infer import Engine, Request, SamplingParams
from megaloom.loading import load_model

PROMPTS = ["the fox walks", "A writer dreams of the long"]


def expected(checkpoint, params: SamplingParams) -> list[str]:
    model, _, tokenizer_path = load_model(checkpoint)
    engine = Engine(model, Tokenizer.from_file(tokenizer_path))
    outputs = engine.generate([Request(p, params) for p in PROMPTS])
    return [c.text for o in outputs for c in o.completions]


def test_tp2_server_answers_like_one_process(checkpoint):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "megaloom", "serve", str(checkpoint), "--port", str(port),
         "--nproc", "2", "--device", "cpu", "--model-name", "tiny", "--log-level", "warning"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, url, timeout=90, interval=0.3)
        for body, params in (
            ({"temperature": 0}, SamplingParams(max_tokens=8, temperature=0.0)),
            ({"temperature": 0.9, "top_k": 20, "seed": 4, "n": 2},
             SamplingParams(max_tokens=8, temperature=0.9, top_k=20, seed=4, n=2)),
        ):
            reply = httpx.post(url + "/v1/completions", timeout=60, json={
                "model": "tiny", "prompt": PROMPTS, "max_tokens": 8, **body})
            assert reply.status_code == 200, reply.text
            texts = [c["text"] for c in sorted(reply.json()["choices"],
                                               key=lambda c: c["index"])]
            assert texts == expected(checkpoint, params)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: torchrun stops every rank
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
