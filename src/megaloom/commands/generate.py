"""`megaloom generate CHECKPOINT|hf:DIR [PROMPT ...]`: sample completions from a model.

Prompts come from the arguments, `--file` (one per line, or JSONL with a `prompt` field) or
stdin. Completions stream to the terminal (in prompt order, the current one live), or go to
`--output FILE.jsonl` and/or `--db [URL]` (`megaloom.infer.sinks`). Everything that can be
checked (sampling values, prompts, output file, database) is checked before the model loads.
The engine (`megaloom.infer.Engine`) batches all prompts with continuous batching. `--nproc N`
(or torchrun) splits the model over N tensor-parallel ranks (`megaloom.infer.tensor_parallel`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from megaloom.errors import DataError, MegaloomError
from megaloom.infer.sinks import DEFAULT_DB_URL, JsonlSink, records_from
from megaloom.utils.launch import Launch, relaunch_under_torchrun, under_torchrun

if TYPE_CHECKING:
    from megaloom.infer import Engine, Event, SamplingParams

NAME = "generate"
HELP = "generate text from a checkpoint (terminal, JSONL or database output)"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="run dir, checkpoint dir or hf:DIR")
    parser.add_argument("prompts", nargs="*", metavar="PROMPT",
                        help="prompts (default: --file, else one per line from stdin)")
    parser.add_argument("--file", help="prompts file: one per line, or JSONL with 'prompt'")
    parser.add_argument("--n", type=int, default=1, help="drafts per prompt (default 1)")
    add_sampling_arguments(parser)
    parser.add_argument("--logprobs", type=int, default=None, metavar="K",
                        help="record token logprobs and K alternatives (JSONL output)")
    parser.add_argument("--echo", action="store_true", help="also record prompt logprobs")
    parser.add_argument("--output", help="append results to this JSONL file")
    parser.add_argument("--db", nargs="?", const=DEFAULT_DB_URL, default=None, metavar="URL",
                        help=f"store results in a SQL database (default URL: {DEFAULT_DB_URL})")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="sequences decoded together (default 8)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu or an accelerator")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="split the model over N tensor-parallel processes (torchrun)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """How each draft is sampled (shared with `megaloom evaluate --task generate`)."""
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="new tokens per draft (default 64)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (temperature 0)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="0 disables (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop string (repeatable); cut from the output")
    parser.add_argument("--stop-token-id", action="append", type=int, default=[],
                        metavar="ID", help="stop token id (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="do not stop at the end-of-document token")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (draft i: seed+i)")


def run(args: argparse.Namespace) -> int:
    from megaloom.infer.tensor_parallel import drive
    from megaloom.loading import load_engine

    if args.nproc > 1 and not under_torchrun():
        return relaunch_under_torchrun(args.nproc, args.command_line)
    params = sampling_params(args).validate()
    leader = Launch.from_environment().is_leader  # under torchrun rank 0 reads and writes
    prompts = read_prompts(args.prompts, args.file, sys.stdin) if leader else []
    sinks = open_sinks(args) if leader else []
    try:
        engine, _ = load_engine(args.checkpoint, args.device, args.batch_size)
        drive(engine, lambda: generate(engine, args.checkpoint, prompts, params, sinks,
                                       stream=not sinks))
    finally:
        for sink in sinks:
            sink.close()
    return 0


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    from megaloom.infer import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        stop=args.stop, stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos,
        n=getattr(args, "n", 1), seed=args.seed, logprobs=getattr(args, "logprobs", None),
        echo=getattr(args, "echo", False))


def read_prompts(given: list[str], file: str | None, stdin: TextIO) -> list[str]:
    """Prompts from arguments, else `file`, else stdin; blank file lines are skipped."""
    if given and file:
        raise MegaloomError("give prompts as arguments or with --file, not both")
    if given:
        for i, prompt in enumerate(given, 1):
            if not prompt.strip():
                raise MegaloomError(f"prompt {i} is empty")
        return list(given)
    if file:
        path = Path(file)
        if not path.is_file():
            raise DataError(f"prompts file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        source = str(path)
    else:
        if stdin.isatty():
            raise MegaloomError("no prompts: pass them as arguments, with --file, or on stdin")
        lines = stdin.read().splitlines()
        source = "<stdin>"
    prompts = [_parse_line(line, source, n) for n, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise DataError(f"{source}: no prompts found")
    return prompts


def _parse_line(line: str, source: str, number: int) -> str:
    if not line.lstrip().startswith("{"):
        return line
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}:{number}: invalid JSON ({exc.msg})") from None
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise DataError(f"{source}:{number}: missing or empty 'prompt' field")
    return prompt


def open_sinks(args: argparse.Namespace) -> list:
    sinks: list = []
    try:
        if args.output:
            sinks.append(JsonlSink(args.output))
        if args.db:
            from megaloom.infer.database import DatabaseSink

            sinks.append(DatabaseSink(args.db))
    except MegaloomError:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def generate(engine: Engine, model_name: str, prompts: list[str], params: SamplingParams,
             sinks: list, stream: bool, out: TextIO | None = None) -> list:
    """Run every prompt; stream to `out` (stdout) or write each finished request to sinks."""
    from tqdm import tqdm

    from megaloom.infer import Request

    printer = StreamPrinter(prompts, params.n, out or sys.stdout) if stream else None
    requests = [Request(p, params, request_id=f"prompt-{i}",
                        on_event=printer.on_event if printer else None)
                for i, p in enumerate(prompts)]
    handles = [engine.add_request(r) for r in requests]
    pending = list(handles)
    start = time.perf_counter()
    tokens = 0
    with tqdm(total=len(handles), desc="generate", unit="prompt",
              disable=stream or not sys.stderr.isatty()) as bar:
        while pending:
            tokens += sum(e.token_id is not None for e in engine.step())
            done = [h for h in pending if h.finished]
            for handle in done:
                pending.remove(handle)
                records = records_from(handle.output, model_name)
                for sink in sinks:
                    sink.write(records)
                bar.update(1)
    elapsed = time.perf_counter() - start
    log.info("generated %d tokens for %d prompt(s) in %.1fs (%.1f tokens/s)", tokens,
             len(prompts), elapsed, tokens / max(elapsed, 1e-9))
    return [h.output for h in handles]


class StreamPrinter:
    """Prints drafts in prompt order: the current one live, later ones when their turn comes."""

    def __init__(self, prompts: list[str], n: int, out: TextIO):
        self.out = out
        self.order = [(f"prompt-{i}", j) for i in range(len(prompts)) for j in range(n)]
        self.prompts = {f"prompt-{i}": p for i, p in enumerate(prompts)}
        self.headers = len(self.order) > 1
        self.n = n
        self.buffers: dict[tuple[str, int], list[str]] = {key: [] for key in self.order}
        self.finished: set[tuple[str, int]] = set()
        self.current = 0
        self._start(self.order[0])

    def on_event(self, event: Event) -> None:
        key = (event.request_id, event.index)
        if key == self.order[self.current]:
            self.out.write(event.text)
            self.out.flush()
        else:
            self.buffers[key].append(event.text)
        if event.finish_reason is not None:
            self.finished.add(key)
            self._advance()

    def _start(self, key: tuple[str, int]) -> None:
        request_id, index = key
        if self.headers:
            number = int(request_id.split("-")[1]) + 1
            draft = f" draft {index + 1}/{self.n}" if self.n > 1 else ""
            self.out.write(f"=== prompt {number}{draft} ===\n")
        self.out.write(self.prompts[request_id] + "".join(self.buffers.pop(key)))
        self.out.flush()

    def _advance(self) -> None:
        while self.order[self.current] in self.finished:
            self.out.write("\n")
            self.current += 1
            if self.current == len(self.order):
                self.out.flush()
                return
            self._start(self.order[self.current])
