"""`megaloom prune MODEL --out DIR --method magnitude|wanda --sparsity S [--pattern
unstructured|2:4|4:8] [--calibration FILE]`: one-shot pruning (`megaloom.compress.oneshot`);
`megaloom prune MODEL --out DIR --structured [--layers N] [--heads N] [--ffn N] --calibration
FILE`: a smaller dense model (`megaloom.compress.structured`).

MODEL is a run, a checkpoint or `hf:DIR`; DIR becomes an ordinary weights-only checkpoint
(zeros stored as zeros, tokenizer copied) that `generate`, `serve`, `evaluate`, `convert` and
`model.init_from` load, with `prune.json` beside it: sparsity overall, per layer and per
tensor. Wanda needs calibration text (`.txt`, or JSONL `text`), cut into `--samples` windows
of the model's `seq_len` tokens, and so does `--structured`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from megaloom.config import PROJECTIONS, PRUNING_TARGETS

NAME = "prune"
HELP = ("prune a model once: magnitude or Wanda, unstructured or N:M (2:4), or structured "
        "(fewer heads, channels, layers)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="run dir, checkpoint dir or hf:DIR")
    parser.add_argument("--out", required=True, metavar="DIR", help="new checkpoint directory")
    parser.add_argument("--method", choices=("magnitude", "wanda"),
                        help="unstructured or N:M scores (default magnitude)")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of each target weight set to zero (N:M patterns imply "
                             "1 - N/M)")
    parser.add_argument("--pattern", help="unstructured (default) or N:M, e.g. 2:4 or 4:8")
    parser.add_argument("--targets",
                        help=f"weights to prune, among {', '.join(PRUNING_TARGETS)} "
                             f"(default: {','.join(PROJECTIONS)})")
    structured = parser.add_argument_group("structured pruning (a smaller dense model)")
    structured.add_argument("--structured", action="store_true",
                            help="remove whole kv groups, MLP channels and layers by "
                                 "activation importance on --calibration text")
    structured.add_argument("--layers", type=int, help="layers to keep")
    structured.add_argument("--heads", type=int,
                            help="query heads to keep per layer (whole kv groups)")
    structured.add_argument("--ffn", type=int, help="MLP channels to keep per layer")
    parser.add_argument("--calibration", metavar="FILE",
                        help="text for Wanda's input norms (.txt or JSONL 'text')")
    parser.add_argument("--samples", type=int, default=32,
                        help="calibration windows of seq_len tokens (default 32)")


def run(args: argparse.Namespace) -> int:
    from megaloom.checkpoint.files import save_model_files
    from megaloom.errors import MegaloomError
    from megaloom.loading import load_model, require_tokenizer

    _check_flags(args)
    if not args.structured:
        from megaloom.compress.oneshot import Pattern, prune_model

        pattern = Pattern.parse(args.pattern or "unstructured")
        targets = _targets(args.targets)
    if args.samples < 1:
        raise MegaloomError("--samples must be >= 1")
    if args.calibration and not Path(args.calibration).is_file():
        raise MegaloomError(f"calibration file not found: {args.calibration}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise MegaloomError(f"--out {out} exists and is not empty")
    model, config, tokenizer_path = load_model(args.model)
    widths = None
    if args.structured:
        from megaloom.compress.structured import Widths, prune_structured

        widths = Widths.resolve(config.model, args.layers, args.heads, args.ffn)
    windows = []
    if args.calibration:
        windows = calibration_windows(args.calibration, require_tokenizer(args.model,
                                                                          tokenizer_path),
                                      config.model.seq_len, args.samples)
    if widths is not None:
        model, report = prune_structured(model, widths, windows)
        config = dataclasses.replace(config, model=model.config)
        summary = (f"kept {widths.layers} layers, {widths.heads} heads, {widths.ffn} MLP "
                   f"channels: {report['parameters']['after']:,} of "
                   f"{report['parameters']['before']:,} parameters "
                   f"({report['parameters']['ratio']:.3f})")
    else:
        report = prune_model(model, args.method or "magnitude", args.sparsity, pattern,
                             targets, windows)
        summary = (f"pruned {len(report['tensors'])} tensors ({report['method']}, "
                   f"{report['pattern']}): {report['overall']:.4f} of their weights are zero")
    save_model_files(out, model, config, tokenizer_path)
    (out / "prune.json").write_text(json.dumps({"model": str(args.model), **report},
                                               indent=2) + "\n")
    print(f"{args.model}: {summary}")
    print(f"checkpoint: {out}")
    return 0


def _check_flags(args: argparse.Namespace) -> None:
    """Structured and unstructured flags do not mix."""
    from megaloom.errors import MegaloomError

    unstructured = [flag for flag in ("method", "sparsity", "pattern", "targets")
                    if getattr(args, flag) is not None]
    widths = [flag for flag in ("layers", "heads", "ffn") if getattr(args, flag) is not None]
    if args.structured and unstructured:
        raise MegaloomError(f"--structured removes whole parts; it takes --layers/--heads/--ffn, "
                            f"not --{', --'.join(unstructured)}")
    if widths and not args.structured:
        raise MegaloomError(f"--{', --'.join(widths)} need --structured")
    if args.structured and not args.calibration:
        raise MegaloomError("--structured needs --calibration text (importance is measured on "
                            "activations)")


def _targets(text: str | None) -> list[str]:
    from megaloom.errors import MegaloomError

    targets = [t.strip() for t in (text or ",".join(PROJECTIONS)).split(",") if t.strip()]
    unknown = [t for t in targets if t not in PRUNING_TARGETS]
    if unknown or not targets:
        raise MegaloomError(f"--targets: unknown weight(s) {unknown or '(none)'}; choose from "
                            f"{', '.join(PRUNING_TARGETS)}")
    return targets


def calibration_windows(path: str, tokenizer_path: Path, seq_len: int, samples: int) -> list:
    """The first `samples` non-overlapping windows of `seq_len` tokens of the text (documents
    joined by the end-of-document token)."""
    import torch

    from megaloom.data.tokenizer import Tokenizer
    from megaloom.errors import DataError
    from megaloom.evaluate.perplexity import read_documents
    from megaloom.tasks.records import BadRecords

    tokenizer = Tokenizer.from_file(tokenizer_path)
    ids: list[int] = []
    for document in read_documents(path, "text", BadRecords(False)):
        ids += [*tokenizer.encode(document.text), tokenizer.eod_id]
        if len(ids) >= samples * seq_len:
            break
    count = min(samples, len(ids) // seq_len)
    if count == 0:
        raise DataError(f"{path}: {len(ids)} tokens, fewer than one {seq_len}-token window")
    return [torch.tensor(ids[i * seq_len:(i + 1) * seq_len]) for i in range(count)]
