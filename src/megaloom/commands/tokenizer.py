"""`megaloom tokenizer train`: train a byte-level BPE tokenizer on .txt/JSONL files."""

from __future__ import annotations

import argparse

NAME = "tokenizer"
HELP = "train a byte-level BPE tokenizer (tokenizer.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE on text files",
                           description="Train a byte-level BPE (with <|endoftext|>) on .txt "
                                       "(documents separated by blank lines) and JSONL files.")
    train.add_argument("files", nargs="+", metavar="FILE", help="files or directories")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True, help="where to write tokenizer.json")
    train.add_argument("--json-key", default="text", help="JSONL key holding the text")
    train.add_argument("--min-frequency", type=int, default=2,
                       help="minimum pair count for a merge")
    train.add_argument("--skip-bad", action="store_true",
                       help="skip (and count) bad records instead of stopping at the first")
    train.add_argument("--mask-token", metavar="TOKEN",
                       help="add a mask token for masked-LM (BERT) training, e.g. '<mask>'")
    train.add_argument("--bert-tokens", action="store_true",
                       help="add [CLS], [SEP] and [MASK] for BERT (task.name=mlm) training")
    train.add_argument("--sentinels", type=int, default=0, metavar="N",
                       help="add <extra_id_0> .. <extra_id_N-1> for T5 span corruption")


def run(args: argparse.Namespace) -> int:
    from megaloom.data.masking import BERT_TOKENS, SENTINEL
    from megaloom.data.tokenizer import ENDOFTEXT, train_bpe
    from megaloom.errors import DataError

    if args.sentinels < 0:
        raise DataError(f"--sentinels must be >= 0, got {args.sentinels}")
    special = [ENDOFTEXT, *(BERT_TOKENS if args.bert_tokens else ()),
               *([args.mask_token] if args.mask_token else []),
               *(SENTINEL.format(i) for i in range(args.sentinels))]
    if len(set(special)) != len(special):
        raise DataError(f"--mask-token {args.mask_token!r} repeats another special token "
                        "(--bert-tokens already adds [MASK])")
    tokenizer = train_bpe(args.files, args.vocab_size, args.output, json_key=args.json_key,
                          min_frequency=args.min_frequency, special_tokens=special,
                          skip_bad=args.skip_bad)
    print(f"{tokenizer.source}  (vocab {tokenizer.vocab_size}, end-of-document id "
          f"{tokenizer.eod_id})")
    return 0
