"""Serving throughput: `megaloom serve` under concurrent streaming clients.

Starts `megaloom serve` as a subprocess on 127.0.0.1 (a random-weight GPT-2 flavour model and
a byte-level BPE trained on a synthetic corpus, or `--checkpoint`), then for each concurrency
level keeps that many streaming `/v1/completions` requests in flight and measures:

- output tokens/s: completion tokens of all requests / wall time of the level,
- time to first token (TTFT): request sent -> first streamed text, p50 and p99,
- inter-token latency (ITL): gaps between streamed chunks after the first, p50 and p99.

The reference is concurrency 1 in the same run: the ratio column shows what continuous
batching buys (target: >= 4x at concurrency 16 on a 2-core CPU).

    python -m benchmarks.serve_throughput [--concurrency 1 4 16 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from benchmarks.common import machine_info, write_json
from megaloom.checkpoint.files import save_model_files
from megaloom.config import Config, ModelConfig
from megaloom.data.tokenizer import train_bpe
from megaloom.model.gpt import GPT

WORDS = ["the", "sea", "river", "house", "garden", "morning", "road", "kite", "writer", "sailor",
         "fox", "cat", "walks", "dreams", "remembers", "sings", "quiet", "bright", "long",
         "empty", "red", "winter", "small", "old"]


def build_checkpoint(root: Path, args: argparse.Namespace) -> Path:
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12))
                                for _ in range(2000)))
    tok = train_bpe([corpus], vocab_size=args.vocab, out_path=root / "tokenizer.json",
                    min_frequency=1, show_progress=False)
    torch.manual_seed(0)
    config = ModelConfig(arch="gpt2", num_layers=args.layers, hidden_size=args.hidden,
                         num_heads=args.heads, seq_len=args.seq_len, vocab_size=tok.vocab_size)
    return save_model_files(root / "model", GPT(config), Config(model=config),
                            root / "tokenizer.json")


def start_server(checkpoint: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "megaloom", "serve", checkpoint, "--port", str(port),
         "--max-batch-size", str(args.max_batch_size), "--max-queue", "256",
         "--model-name", "bench", "--log-level", "warning"],
        env={**os.environ, "MEGALOOM_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"megaloom serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("megaloom serve did not come up within 120 s")


async def one_request(client: httpx.AsyncClient, body: dict) -> dict:
    sent = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c["text"] for c in chunk["choices"]):
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"ttft": stamps[0] - sent if stamps else float("nan"), "gaps": gaps,
            "tokens": tokens}


async def run_level(url: str, concurrency: int, requests: int, args: argparse.Namespace
                    ) -> dict:
    rng = random.Random(concurrency)
    bodies = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(args.prompt_words)),
               "max_tokens": args.max_tokens, "temperature": 0.8, "seed": i,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
              for i in range(requests)]
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def gated(body: dict) -> dict:
            async with gate:
                return await one_request(client, body)

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(b) for b in bodies))
        wall = time.perf_counter() - start
    ttft = sorted(r["ttft"] for r in results)
    gaps = sorted(g for r in results for g in r["gaps"])
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": requests, "output_tokens": tokens,
            "wall_s": wall, "output_tokens_per_s": tokens / wall,
            "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(gaps, 50), "itl_p99_s": pct(gaps, 99)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="serve this checkpoint instead of a random model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per level (default: 2 x concurrency, at least 8)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or str(build_checkpoint(Path(tmp), args))
        proc, url = start_server(checkpoint, args)
        try:
            asyncio.run(run_level(url, 2, 2, args))  # warm-up
            levels = [asyncio.run(run_level(url, c, args.requests or max(2 * c, 8), args))
                      for c in args.concurrency]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    base = levels[0]["output_tokens_per_s"]
    print(f"{'conc':>5} {'tok/s':>9} {'ratio':>6} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8}")
    for level in levels:
        level["ratio_vs_first"] = level["output_tokens_per_s"] / base
        print(f"{level['concurrency']:>5} {level['output_tokens_per_s']:>9.1f} "
              f"{level['ratio_vs_first']:>5.1f}x {level['ttft_p50_s'] * 1e3:>7.0f}ms "
              f"{level['ttft_p99_s'] * 1e3:>7.0f}ms {level['itl_p50_s'] * 1e3:>6.1f}ms "
              f"{level['itl_p99_s'] * 1e3:>6.1f}ms")
    write_json(args.json, {"benchmark": "serve_throughput", "machine": machine_info(),
                           "settings": {k: v for k, v in vars(args).items() if k != "json"},
                           "levels": levels})


if __name__ == "__main__":
    main()
