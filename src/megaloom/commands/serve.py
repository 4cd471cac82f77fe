"""`megaloom serve CHECKPOINT|hf:DIR`: the HTTP API and web writing assistant.

Loads the model and tokenizer, builds the engine and `megaloom.serve.create_app`, and runs it
under uvicorn (127.0.0.1 unless `--host` says otherwise). The API key comes from `--api-key`
or the `MEGALOOM_API_KEY` environment variable. Every option is checked before the model
loads. Ctrl-C / SIGTERM stops accepting, finishes in-flight requests, then exits. `--nproc N`
(or torchrun) splits the model over N tensor-parallel ranks: rank 0 serves HTTP, the others
follow its engine (`megaloom.infer.tensor_parallel`).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from megaloom.errors import MegaloomError
from megaloom.utils.launch import relaunch_under_torchrun, under_torchrun

NAME = "serve"
HELP = "serve a checkpoint over HTTP (OpenAI + Megatron APIs, web writing assistant)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="run dir, checkpoint dir or hf:DIR")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--api-key", default=None,
                        help="require this key on every route but /health "
                             "(default: $MEGALOOM_API_KEY, else no key)")
    parser.add_argument("--max-batch-size", "--max-batch", dest="max_batch_size", type=int,
                        default=16, help="sequences decoded together (default 16)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="sequences that may wait for the batch; more get 429 (default 64)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a request may take before it is cancelled (default 600)")
    parser.add_argument("--model-name", default=None,
                        help="name clients use in 'model' (default: the checkpoint's name)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20,
                        help="largest accepted request body (default 1 MiB)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or an accelerator")
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn log level (default info)")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="split the model over N tensor-parallel processes (torchrun); "
                             "rank 0 serves HTTP")


def run(args: argparse.Namespace) -> int:
    if args.nproc > 1 and not under_torchrun():
        return relaunch_under_torchrun(args.nproc, args.command_line)
    _check(args)
    import uvicorn

    from megaloom.infer.tensor_parallel import drive
    from megaloom.loading import load_engine
    from megaloom.serve import create_app

    # under torchrun, rank 0 serves and the others follow
    engine, tokenizer_path = load_engine(args.checkpoint, args.device, args.max_batch_size)

    def serve() -> None:
        app = create_app(engine, engine.tokenizer,
                         args.model_name or model_name(args.checkpoint),
                         tokenizer_path=tokenizer_path,
                         api_key=args.api_key or os.environ.get("MEGALOOM_API_KEY") or None,
                         max_queue=args.max_queue, timeout=args.timeout,
                         max_body_bytes=args.max_body_bytes)
        log.info("serving on http://%s:%d (web page at /, API under /v1)", args.host,
                 args.port)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)

    drive(engine, serve)
    return 0


def _check(args: argparse.Namespace) -> None:
    for name, low in (("port", 0), ("max_batch_size", 1), ("max_queue", 0),
                      ("max_body_bytes", 1)):
        if getattr(args, name) < low:
            flag = "--" + name.replace("_", "-")
            raise MegaloomError(f"{flag} must be >= {low}, got {getattr(args, name)}")
    if args.port > 65535:
        raise MegaloomError(f"--port must be <= 65535, got {args.port}")
    if args.timeout <= 0:
        raise MegaloomError(f"--timeout must be > 0, got {args.timeout}")


def model_name(checkpoint: str) -> str:
    """The default model name: the checkpoint's directory name (`hf:` prefix dropped)."""
    path = Path(checkpoint[3:] if checkpoint.startswith("hf:") else checkpoint)
    return path.resolve().name or "megaloom"
