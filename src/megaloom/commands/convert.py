"""`megaloom convert`: Hugging Face GPT-2/Llama checkpoints <-> megaloom checkpoints.

`hf-to-megaloom HF_DIR OUT` writes a megaloom checkpoint directory; `megaloom-to-hf SPEC OUT`
reads anything `load_model` accepts (run dir, checkpoint dir, `hf:DIR`) and writes a directory
`transformers` loads (LoRA adapters merged); `megaloom-to-peft RUN OUT` writes a LoRA run's
adapter for `peft` and its base model. The work lives in `megaloom.interop.hf` and
`megaloom.finetune.peft_export`.
"""

from __future__ import annotations

import argparse

NAME = "convert"
HELP = "convert checkpoints between Hugging Face (GPT-2, Llama) and megaloom formats"

DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_MAX_SHARD_SIZE = "5GB"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    to_ours = sub.add_parser("hf-to-megaloom", help="Hugging Face directory -> megaloom checkpoint")
    to_ours.add_argument("hf_dir", metavar="HF_DIR",
                         help="directory with config.json and model.safetensors (or shards)")
    to_ours.add_argument("out", metavar="OUT", help="new checkpoint directory (must be empty)")
    to_hf = sub.add_parser("megaloom-to-hf", help="megaloom checkpoint -> Hugging Face directory")
    to_hf.add_argument("checkpoint", metavar="CHECKPOINT",
                       help="run dir, checkpoint dir or hf:DIR")
    to_hf.add_argument("out", metavar="OUT", help="new Hugging Face directory (must be empty)")
    to_hf.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                       help="largest safetensors file before sharding, e.g. 5GB or 500MB "
                            "(default: 5GB)")
    to_hf.add_argument("--dtype", choices=DTYPES, default=None,
                       help="weight dtype of the export (default: the checkpoint's)")
    to_peft = sub.add_parser("megaloom-to-peft",
                             help="LoRA run -> PEFT adapter (+ its base model in OUT/base)")
    to_peft.add_argument("checkpoint", metavar="RUN", help="run or checkpoint dir of a LoRA run")
    to_peft.add_argument("out", metavar="OUT", help="new adapter directory (must be empty)")


def run(args: argparse.Namespace) -> int:
    import torch

    from megaloom.interop.hf import export_hf, import_hf
    from megaloom.interop.weight_files import parse_size

    if args.direction == "hf-to-megaloom":
        out = import_hf(args.hf_dir, args.out)
    elif args.direction == "megaloom-to-peft":
        from megaloom.finetune.peft_export import export_peft

        out = export_peft(args.checkpoint, args.out)
    else:
        from megaloom.checkpoint.reader import LazyState, open_checkpoint
        from megaloom.loading import load_model

        max_shard_size = parse_size(args.max_shard_size)  # a typo fails before the slow load
        if str(args.checkpoint).startswith("hf:"):
            weights, config, tokenizer_path = load_model(args.checkpoint)
        else:  # streamed: one tensor read and converted at a time
            from megaloom.compress.quantize import refuse_quantized

            checkpoint = open_checkpoint(args.checkpoint)
            refuse_quantized(checkpoint.directory, "export to Hugging Face")
            weights, config = LazyState(checkpoint), checkpoint.config
            tokenizer_path = checkpoint.tokenizer
        out = export_hf(weights, config, args.out, tokenizer_path=tokenizer_path,
                        max_shard_size=max_shard_size,
                        dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(out)
    return 0
