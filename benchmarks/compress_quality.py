"""Compression, measured twice: perplexity and speed of one-shot pruned models against the
dense fp32 and bf16 model, all in the same run.

For each variant of one trained model (`--model`, e.g. the `make train` run): perplexity under
megaloom evaluate's `chunks` protocol (Wanda/SparseGPT's: non-overlapping `seq_len` chunks,
tail dropped) on `--data` (default: the last `--documents` documents of the embedded corpus,
which the model may have seen in training; Wanda calibrates on the first ones), its change
against dense fp32, the bytes of its safetensors files on disk and zlib-compressed (level 6),
and decode tokens/s at batch 1 and 8 plus prefill tokens/s through the inference engine
(greedy, best of `--repeats`, the runners of `benchmarks.generate_throughput`). Variants:
dense fp32, dense bf16, magnitude and Wanda at 50% unstructured and at 2:4, int8 and int4
(group 128) quantisation (`megaloom quantize`; with their top-1 agreement with fp32 over the
calibration windows), and structured
pruning (`--layers/--heads/--ffn`, a smaller dense model) as pruned and after `--recover-steps`
steps of recovery training on the model's own data: plain next-token training, and
distillation from the dense model (`task.name=distill`), at the same steps and learning rate,
beside the dense model trained those steps too (the control: how much is just more training).

    python -m benchmarks.compress_quality --model runs/tiny [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import zlib
from pathlib import Path

import torch

from benchmarks.common import machine_info, write_json
from benchmarks.generate_throughput import measure, run_megaloom
from megaloom.checkpoint.files import save_model_files
from megaloom.cli import main as megaloom
from megaloom.commands.prune import calibration_windows
from megaloom.compress.oneshot import Pattern, prune_model
from megaloom.compress.quantize import Int4Linear, Int8Linear, QuantSpec, quantize_model
from megaloom.compress.structured import Widths, prune_structured
from megaloom.config import PROJECTIONS
from megaloom.data.tokenizer import Tokenizer
from megaloom.evaluate.perplexity import Document, perplexity
from megaloom.evaluate.scoring import Scorer
from megaloom.infer import Engine
from megaloom.loading import load_model
from megaloom.tasks.records import BadRecords

VARIANTS = [("dense fp32", None, None), ("dense bf16", None, None),
            ("magnitude 50%", "magnitude", "unstructured"), ("wanda 50%", "wanda", "unstructured"),
            ("magnitude 2:4", "magnitude", "2:4"), ("wanda 2:4", "wanda", "2:4"),
            ("int8 (fbgemm W8A8-dynamic)", "quantize", 8), ("int4 g128", "quantize", 4)]


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


def measure_variant(name: str, model, config, tokenizer, tokenizer_path, documents, args,
                    sparsity: float = 0.0) -> dict:
    """One table row: perplexity, size on disk and speeds of `model`."""
    seq_len = config.model.seq_len
    scorer = Scorer(model, config.model.vocab_size, seq_len + 1, 8, progress=False)
    ppl = perplexity(scorer, tokenizer, documents, "chunks", seq_len, seq_len, BadRecords(False))
    raw, packed = disk_bytes(model, config, tokenizer_path)
    row = {"variant": name, "sparsity": sparsity,
           "parameters": logical_parameters(model),
           "perplexity": ppl["perplexity"], "protocol": ppl["protocol"],
           "tokens_scored": ppl["tokens_scored"], "disk_bytes": raw, "zlib_bytes": packed,
           **speed(model, args, config.model.vocab_size)}
    print(f"{name:24s} sparsity {sparsity:.3f}  params {row['parameters']:,}  "
          f"ppl {row['perplexity']:9.3f}  disk {raw / 2**20:6.2f} MiB (zlib {packed / 2**20:6.2f})"
          f"  decode b1 {row['decode_b1']:7.1f} b8 {row['decode_b8']:7.1f} tok/s  "
          f"prefill b1 {row['prefill_b1']:7.1f} b8 {row['prefill_b8']:7.1f} tok/s", flush=True)
    return row


def logical_parameters(model) -> int:
    """Weights of the model whatever their storage: float parameters plus the (out x in)
    weights and biases of quantised projections."""
    quantized = sum(m.out_features * m.in_features + (0 if m.bias is None else m.bias.numel())
                    for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear)))
    return sum(p.numel() for p in model.parameters()) + quantized


def recover(start, out: Path, config, args, *task: str) -> Path:
    """`megaloom train` from checkpoint `start` on the dense model's data; the run dir."""
    status = megaloom(["train", f"model.init_from={start}",
                       f"data.prefixes=[{','.join(config.data.prefixes)}]",
                       f"data.tokenizer={config.data.tokenizer}",
                       f"data.cache_dir={config.data.cache_dir}",
                       f"train.max_steps={args.recover_steps}", f"train.lr={args.recover_lr}",
                       f"train.min_lr={args.recover_lr / 10}", "train.warmup_steps=10",
                       f"train.micro_batch_size={config.train.micro_batch_size}",
                       f"train.global_batch_size={config.train.global_batch_size}",
                       f"train.eval_interval={args.recover_steps}", "train.eval_iters=4",
                       f"train.save_interval={args.recover_steps}", "train.precision=fp32",
                       *task, "--out", str(out), "--samples", "0", "--no-resume"])
    if status:
        raise SystemExit(f"recovery training into {out} failed (exit {status})")
    return out


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
    parser.add_argument("--layers", type=int, help="structured: layers kept (default: one less)")
    parser.add_argument("--heads", type=int, help="structured: query heads kept")
    parser.add_argument("--ffn", type=int,
                        help="structured: MLP channels kept (default: 3/4 of the width)")
    parser.add_argument("--recover-steps", type=int, default=150,
                        help="recovery training steps after structured pruning (0: none)")
    parser.add_argument("--recover-lr", type=float, default=5e-4)
    parser.add_argument("--distill-temperature", type=float, default=1.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    args.temperature, args.top_p = 0.0, 1.0  # greedy decoding in the speed runs

    dense, config, tokenizer_path = load_model(args.model)
    seq_len = config.model.seq_len
    tokenizer = Tokenizer.from_file(tokenizer_path)
    text = corpus_text(args.data, args.documents, last=True)
    calibration = calibration_windows_from(corpus_text(args.calibration, args.documents,
                                                       last=False),
                                           tokenizer_path, seq_len, args)
    documents = [Document("evaluation text", text)]
    measured = (tokenizer, tokenizer_path, documents, args)
    rows = []
    for name, method, pattern in VARIANTS:
        model = copy.deepcopy(dense)
        report = {}
        if method == "quantize":
            quantize_model(model, QuantSpec.checked(pattern, None, []))
            kernels = {m.kernel_name for m in model.modules() if isinstance(m, Int4Linear)}
            name += f" ({', '.join(sorted(kernels))})" if kernels else ""
        elif method:
            report = prune_model(model, method, None if pattern != "unstructured" else 0.5,
                                 Pattern.parse(pattern), list(PROJECTIONS),
                                 calibration if method == "wanda" else ())
        if "bf16" in name:
            model = model.to(torch.bfloat16)
        rows.append(measure_variant(name, model, config, *measured,
                                    sparsity=report.get("overall", 0.0)))
        rows[-1]["top1_agreement"] = top1_agreement(model, dense, calibration)
    rows += structured_rows(dense, config, calibration, measured, args)
    base = rows[0]
    for row in rows:
        row["perplexity_change"] = row["perplexity"] / base["perplexity"] - 1
        row["parameter_ratio"] = row["parameters"] / base["parameters"]
        for key in ("decode_b1", "decode_b8", "prefill_b1", "prefill_b8"):
            row[f"{key}_x_fp32"] = row[key] / base[key]
    print(f"\nmodel {args.model}: {base['parameters']:,} parameters, perplexity protocol: "
          f"{base['protocol']}, {base['tokens_scored']} tokens")
    print("| variant | sparsity | parameters (x dense) | perplexity | change | top-1 = fp32 | "
          "disk MiB (zlib) | decode b1 / b8 tok/s (x fp32) | prefill b1 / b8 tok/s (x fp32) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        agreement = f"{r['top1_agreement']:.3f}" if "top1_agreement" in r else "-"
        print(f"| {r['variant']} | {r['sparsity']:.2f} | {r['parameter_ratio']:.2f} | "
              f"{r['perplexity']:.2f} | {100 * r['perplexity_change']:+.1f}% | {agreement} | "
              f"{r['disk_bytes'] / 2**20:.2f} ({r['zlib_bytes'] / 2**20:.2f}) | "
              f"{r['decode_b1']:.0f} / {r['decode_b8']:.0f} "
              f"({r['decode_b1_x_fp32']:.2f} / {r['decode_b8_x_fp32']:.2f}) | "
              f"{r['prefill_b1']:.0f} / {r['prefill_b8']:.0f} ({r['prefill_b1_x_fp32']:.2f} / "
              f"{r['prefill_b8_x_fp32']:.2f}) |")
    if len(rows) > len(VARIANTS) + 1:
        pruned, _, lm, distilled = (r["perplexity"] for r in rows[len(VARIANTS):])
        lost = pruned - base["perplexity"]
        if lost > 0:
            print(f"recovery of the structured model's perplexity loss ({lost:+.2f}): "
                  f"next-token training {(pruned - lm) / lost:.0%}, distillation "
                  f"{(pruned - distilled) / lost:.0%}")
    machine = machine_info()
    print(f"machine: {machine}")
    write_json(args.json, {"machine": machine, "model": args.model, "rows": rows})


def structured_rows(dense, config, calibration, measured, args) -> list[dict]:
    """Structured pruning, then (when `--recover-steps`) the same steps of next-token training
    on the dense model (the control), and the two recoveries of the pruned one, measured."""
    model = dense.config
    widths = Widths.resolve(model, args.layers or max(1, model.num_layers - 1), args.heads,
                            args.ffn or model.ffn_hidden_size * 3 // 4)
    small, report = prune_structured(copy.deepcopy(dense), widths, calibration)
    small_config = dataclasses.replace(config, model=small.config)
    label = f"structured {widths.layers}L/{widths.heads}h/{widths.ffn}"
    rows = [measure_variant(label, small, small_config, *measured)]
    if not args.recover_steps:
        return rows
    distill = ("task.name=distill", f"task.distill.teacher={args.model}",
               f"task.distill.temperature={args.distill_temperature}")
    with tempfile.TemporaryDirectory() as tmp:
        pruned_dir = save_model_files(Path(tmp) / "pruned", small, small_config,
                                      measured[1])
        for start, name, task in ((args.model, "dense", ()),  # the control: more training
                                  (pruned_dir, f"{label} +", ()),
                                  (pruned_dir, f"{label} +", distill)):
            kind = "distilled" if task else "next-token"
            run = recover(start, Path(tmp) / f"{name}-{kind}".replace(" ", "_").replace(
                "/", "_"), config, args, *task)
            trained, trained_config, _ = load_model(run)
            rows.append(measure_variant(f"{name} {args.recover_steps} {kind}", trained,
                                        trained_config, *measured))
    print(f"structured: {report['parameters']['after']:,} of "
          f"{report['parameters']['before']:,} parameters", flush=True)
    return rows


@torch.no_grad()
def top1_agreement(model, dense, windows) -> float:
    """How often `model`'s most likely next token equals the dense fp32 model's, over every
    position of `windows` (teacher-forced greedy agreement)."""
    same = total = 0
    for window in windows[:8]:
        tokens = window[None]
        want = dense(tokens).argmax(-1)
        same += int((model(tokens).float().argmax(-1) == want).sum())
        total += want.numel()
    return same / total


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
