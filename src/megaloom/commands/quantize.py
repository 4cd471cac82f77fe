"""`megaloom quantize MODEL --out DIR --bits 8|4 [--group-size G] [--skip KIND,...]`:
weight quantisation for CPU inference (`megaloom.compress.quantize`).

MODEL is a run, a checkpoint or `hf:DIR`. DIR becomes a weights-only checkpoint whose
projections are stored quantised (`NAME.qweight`, `NAME.scales`) and described by
`quantization.json` (written atomically with the weights); `generate`, `serve` and
`evaluate` load it on the CPU, whole or tensor-parallel (each rank reading its own shard).
Training from it and converting it are refused with that reason (use the float checkpoint).
"""

from __future__ import annotations

import argparse
import json

from megaloom.config import PROJECTIONS

NAME = "quantize"
HELP = "quantise a model's projections to int8 or int4 for faster CPU inference"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="run dir, checkpoint dir or hf:DIR")
    parser.add_argument("--out", required=True, metavar="DIR", help="new checkpoint directory")
    parser.add_argument("--bits", type=int, required=True, help="8 (per output channel) or 4 "
                                                                "(per group)")
    parser.add_argument("--group-size", type=int,
                        help="inputs per int4 scale: 32, 64, 128 (default) or 256")
    parser.add_argument("--skip", default="",
                        help=f"projection kinds left in float, among {', '.join(PROJECTIONS)} "
                             "(embeddings, norms and the output head always stay float)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megaloom.checkpoint.files import save_model_files
    from megaloom.compress.quantize import QUANT_FILE, QuantSpec, quantize_model
    from megaloom.errors import MegaloomError
    from megaloom.loading import load_model

    spec = QuantSpec.checked(args.bits, args.group_size,
                             [s for s in args.skip.split(",") if s.strip()])
    out = Path(args.out)
    if out.exists():
        raise MegaloomError(f"--out {out} already exists; choose a new directory")
    model, config, tokenizer_path = load_model(args.model)
    report = quantize_model(model, spec)
    save_model_files(out, model, config, tokenizer_path,
                     {QUANT_FILE: json.dumps({"model": str(args.model), **report}, indent=2)})
    print(f"{args.model}: {len(report['quantized'])} projections quantised "
          f"({report['scheme']})")
    print(f"checkpoint: {out}")
    return 0
