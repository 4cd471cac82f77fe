"""Compression, measured twice: perplexity and speed of one-shot pruned models against the
dense fp32 and bf16 model, all in the same run.

For each variant of one trained model (`--model`, e.g. the `make train` run): perplexity under
megaloom evaluate's `chunks` protocol (Wanda/SparseGPT's: non-overlapping `seq_len` chunks,
tail dropped) on `--data` (default: the last `--documents` documents of the embedded corpus,
which the model may have seen in training; Wanda calibrates on the first ones), its change
against dense fp32, the bytes of its safetensors files on disk and zlib-compressed (level 6),
and decode tokens/s at batch 1 and 8 plus prefill tokens/s through the inference engine
(greedy, best of `--repeats`, the runners of `benchmarks.generate_throughput`). Variants:
dense fp32, dense bf16, magnitude and Wanda at 50% unstructured and at 2:4.

    python -m benchmarks.compress_quality --model runs/tiny [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import zlib
from pathlib import Path

import torch

from benchmarks.common import machine_info, write_json
from benchmarks.generate_throughput import measure, run_megaloom
from megaloom.checkpoint.files import save_model_files
from megaloom.commands.prune import calibration_windows
from megaloom.compress.oneshot import Pattern, prune_model
from megaloom.config import PROJECTIONS
from megaloom.data.tokenizer import Tokenizer
from megaloom.evaluate.perplexity import Document, perplexity
from megaloom.evaluate.scoring import Scorer
from megaloom.infer import Engine
from megaloom.loading import load_model
from megaloom.tasks.records import BadRecords

VARIANTS = [("dense fp32", None, None), ("dense bf16", None, None),
            ("magnitude 50%", "magnitude", "unstructured"), ("wanda 50%", "wanda", "unstructured"),
            ("magnitude 2:4", "magnitude", "2:4"), ("wanda 2:4", "wanda", "2:4")]


def corpus_text(path: str | None, documents: int, last: bool) -> str:
    """`path`'s text, or the first or last `documents` documents of the embedded corpus."""
    if path:
        return Path(path).read_text(encoding="utf-8")
    from megaloom.data.default_corpus import corpus_documents

    every = corpus_documents()
    return "\n\n".join(every[-documents:] if last else every[:documents])


def disk_bytes(model, config, tokenizer) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        save_model_files(Path(tmp) / "ckpt", model, config, tokenizer)
        files = sorted((Path(tmp) / "ckpt").rglob("*.safetensors"))
        raw = sum(f.stat().st_size for f in files)
        packed = sum(len(zlib.compress(f.read_bytes(), 6)) for f in files)
    return raw, packed


def speed(model, args, vocab: int) -> dict:
    figures = {}
    for batch in (1, 8):
        prompts = torch.randint(0, vocab, (batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(batch))
        engine = Engine(model, max_batch_size=batch)
        run_megaloom(engine, prompts, 8, args)  # warm-up
        results: dict = {}
        for _ in range(args.repeats):
            measure("run", run_megaloom, engine, prompts, args, results)
        r = results["run"]
        figures[f"decode_b{batch}"] = batch * (args.new_tokens - 1) / (r["total_s"] - r["ttft_s"])
        figures[f"prefill_b{batch}"] = batch * args.prompt_len / r["ttft_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="runs/tiny", help="run dir, checkpoint or hf:DIR")
    parser.add_argument("--data", help="evaluation text (.txt); default: the embedded corpus")
    parser.add_argument("--calibration", help="Wanda's calibration text (.txt); default: the "
                                              "first --documents documents of the corpus")
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    args.temperature, args.top_p = 0.0, 1.0

    dense, config, tokenizer_path = load_model(args.model)
    seq_len = config.model.seq_len
    tokenizer = Tokenizer.from_file(tokenizer_path)
    text = corpus_text(args.data, args.documents, last=True)
    calibration = calibration_windows_from(corpus_text(args.calibration, args.documents,
                                                       last=False),
                                           tokenizer_path, seq_len, args)
    documents = [Document("evaluation text", text)]
    rows = []
    for name, method, pattern in VARIANTS:
        model = copy.deepcopy(dense)
        report = {}
        if method:
            report = prune_model(model, method, None if pattern != "unstructured" else 0.5,
                                 Pattern.parse(pattern), list(PROJECTIONS),
                                 calibration if method == "wanda" else ())
        if "bf16" in name:
            model = model.to(torch.bfloat16)
        scorer = Scorer(model, config.model.vocab_size, seq_len + 1, 8, progress=False)
        ppl = perplexity(scorer, tokenizer, documents, "chunks", seq_len, seq_len,
                         BadRecords(False))
        raw, packed = disk_bytes(model, config, tokenizer_path)
        row = {"variant": name, "sparsity": report.get("overall", 0.0),
               "perplexity": ppl["perplexity"], "tokens_scored": ppl["tokens_scored"],
               "disk_bytes": raw, "zlib_bytes": packed, **speed(model, args,
                                                                  config.model.vocab_size)}
        rows.append(row)
        print(f"{name:14s} sparsity {row['sparsity']:.3f}  ppl {row['perplexity']:9.3f}  "
              f"disk {raw / 2**20:6.2f} MiB (zlib {packed / 2**20:6.2f})  "
              f"decode b1 {row['decode_b1']:7.1f} b8 {row['decode_b8']:7.1f} tok/s  "
              f"prefill b1 {row['prefill_b1']:7.1f} b8 {row['prefill_b8']:7.1f} tok/s",
              flush=True)
    base = rows[0]
    for row in rows:
        row["perplexity_change"] = row["perplexity"] / base["perplexity"] - 1
        for key in ("decode_b1", "decode_b8", "prefill_b1", "prefill_b8"):
            row[f"{key}_x_fp32"] = row[key] / base[key]
    print(f"\nmodel {args.model}: {sum(p.numel() for p in dense.parameters()):,} parameters, "
          f"perplexity protocol: {ppl['protocol']}, {ppl['tokens_scored']} tokens")
    print("| variant | sparsity | perplexity | change | disk MiB (zlib) | decode b1 / b8 tok/s "
          "(x fp32) | prefill b1 / b8 tok/s (x fp32) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['sparsity']:.2f} | {r['perplexity']:.2f} | "
              f"{100 * r['perplexity_change']:+.1f}% | {r['disk_bytes'] / 2**20:.2f} "
              f"({r['zlib_bytes'] / 2**20:.2f}) | {r['decode_b1']:.0f} / {r['decode_b8']:.0f} "
              f"({r['decode_b1_x_fp32']:.2f} / {r['decode_b8_x_fp32']:.2f}) | "
              f"{r['prefill_b1']:.0f} / {r['prefill_b8']:.0f} ({r['prefill_b1_x_fp32']:.2f} / "
              f"{r['prefill_b8_x_fp32']:.2f}) |")
    machine = machine_info()
    print(f"machine: {machine}")
    write_json(args.json, {"machine": machine, "model": args.model, "rows": rows})


def calibration_windows_from(text: str, tokenizer_path, seq_len: int, args) -> list:
    """Wanda's calibration windows of `text`."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write(text)
    try:
        return calibration_windows(handle.name, tokenizer_path, seq_len,
                                   args.calibration_samples)
    finally:
        Path(handle.name).unlink()


if __name__ == "__main__":
    main()
