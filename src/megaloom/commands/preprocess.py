"""`megaloom preprocess`: tokenize .txt/JSONL files into Megatron's .bin/.idx layout."""

from __future__ import annotations

import argparse

NAME = "preprocess"
HELP = "tokenize .txt / JSONL files (or directories) into Megatron .bin/.idx files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help=".txt files (documents separated by blank lines), .jsonl/.json "
                             "files (one JSON object per line) or directories of them")
    parser.add_argument("--output-prefix", required=True,
                        help="outputs are {prefix}_{json_key}_document.bin/.idx")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json (or its directory)")
    parser.add_argument("--json-key", default="text", help="JSONL key holding the text")
    parser.add_argument("--append-eod", action="store_true",
                        help="end every document with the end-of-document token")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip (and count) bad records instead of stopping at the first")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    from megaloom.data.preprocess import preprocess

    stats = preprocess(args.input, args.output_prefix, args.tokenizer, json_key=args.json_key,
                       append_eod=args.append_eod, workers=args.workers,
                       skip_bad=args.skip_bad, show_progress=not args.no_progress)
    summary = f"{stats.documents} documents, {stats.tokens} tokens"
    if args.skip_bad:
        summary += f", {stats.bad_skipped} bad record(s) skipped"
    print(f"{stats.prefix}  ({summary})")
    return 0
