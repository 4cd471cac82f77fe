"""Perplexity throughput: `megaloom evaluate`'s scorer against a plain `transformers` forward
loop (the Hugging Face perplexity guide's, batched) on the same weights, windows and batch.

One random GPT-2-shaped model is exported to Hugging Face format and loaded back as
`GPT2LMHeadModel`; both sides score the same strided windows of one token stream (`--max-length`,
`--stride`) `--batch` windows per forward, fp32, under `torch.inference_mode()`. Runs alternate
after a warm-up; the median of `--repeats` is reported as scored tokens/s, with the ratio
(target: at least 1.2x) and the two perplexities (they must agree).

    python -m benchmarks.evaluate_throughput [--tokens 8192] [--json out.json]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time

import torch

from benchmarks.common import machine_info, write_json
from megaloom.config import Config, ModelConfig
from megaloom.evaluate.perplexity import strided_windows
from megaloom.evaluate.scoring import Scorer
from megaloom.interop.hf import export_hf
from megaloom.model.gpt import GPT


def hf_loop(model, windows, batch: int) -> float:
    """Summed NLL over the windows' scored targets, the guide's way: labels -100 elsewhere."""
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(windows), batch):
            chunk = windows[start:start + batch]
            width = max(len(w.tokens) for w in chunk)
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, window in enumerate(chunk):
                tokens = torch.as_tensor(window.tokens)
                inputs[row, :len(tokens)] = tokens
                labels[row, len(tokens) - window.scored:len(tokens)] = tokens[-window.scored:]
            count = int((labels[:, 1:] != -100).sum())
            total += model(inputs, labels=labels).loss.item() * count
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=8192, help="length of the token stream")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()

    from transformers import GPT2LMHeadModel

    config = ModelConfig(arch="gpt2", num_layers=args.layers, hidden_size=args.hidden,
                         num_heads=args.heads, seq_len=args.max_length, vocab_size=args.vocab)
    model = GPT(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, Config(model=config), tmp)
        reference = GPT2LMHeadModel.from_pretrained(tmp, attn_implementation="sdpa").eval()
    stream = torch.randint(0, args.vocab, (args.tokens,), generator=torch.Generator()
                           .manual_seed(0)).tolist()
    windows = strided_windows(stream, args.max_length, args.stride)
    scored = sum(w.scored for w in windows)
    scorer = Scorer(model, args.vocab, args.max_length + 1, args.batch, progress=False)
    runs = {"megaloom": lambda: -sum(s.total for s in scorer.score(windows)),
            "transformers": lambda: hf_loop(reference, windows, args.batch)}
    times = {name: [] for name in runs}
    nll = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, run in runs.items():
            started = time.perf_counter()
            nll[name] = run()
            if repeat:
                times[name].append(time.perf_counter() - started)
    rates = {name: scored / statistics.median(t) for name, t in times.items()}
    ppl = {name: math.exp(value / scored) for name, value in nll.items()}
    info = machine_info()
    print(f"gpt2 {args.layers}x{args.hidden}, vocab {args.vocab}, windows of {args.max_length} "
          f"every {args.stride}, batch {args.batch}, fp32, {info['cpu']} ({info['cores']} "
          f"cores, {info['torch_threads']} threads)")
    print(f"{'scorer':<13} {'tokens/s':>10} {'perplexity':>12}")
    for name in runs:
        print(f"{name:<13} {rates[name]:>10.0f} {ppl[name]:>12.4f}")
    ratio = rates["megaloom"] / rates["transformers"]
    print(f"megaloom / transformers: {ratio:.2f}x ({scored} tokens scored in {len(windows)} "
          f"windows)")
    write_json(args.json, {"machine": info, "shape": vars(args), "tokens_per_s": rates,
                           "perplexity": ppl, "ratio": ratio})


if __name__ == "__main__":
    main()
