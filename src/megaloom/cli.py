"""`megaloom <command>`: the command-line entry point.

Each command lives in its own module under `megaloom.commands` exposing `NAME`, `HELP`,
`add_arguments(parser)` and `run(args) -> int`; this file only discovers and dispatches them.
Errors the user can fix (`MegaloomError` and its kin) print one clear line and exit 2, never
a traceback.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import logging
import pkgutil
import sys

import megaloom.commands as commands_pkg
from megaloom import __version__
from megaloom.errors import USER_ERRORS, PeerFailure, describe_failure, is_disk_full


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megaloom",
        description="Train, fine-tune, evaluate and serve GPT-style language models.",
    )
    parser.add_argument("--version", action="version", version=f"megaloom {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands_pkg.__name__}.{info.name}")
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    command_line = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(command_line)
    args.command_line = command_line  # what `--nproc N` re-runs under torchrun
    # `key=value` overrides may follow options (`train CONFIG --out DIR train.lr=1e-3`).
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
        "=" in item and not item.startswith("-") for item in extra
    ):
        args.overrides.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        code = int(args.handler(args) or 0)
    except USER_ERRORS as exc:
        print(f"megaloom {args.command}: error: {exc}", file=sys.stderr)
        if isinstance(exc, PeerFailure):
            exit_within(PEER_FAILURE_EXIT_S)
        return 2
    except KeyboardInterrupt:
        print(f"megaloom {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        print(f"megaloom {args.command}: error: {describe_failure(exc)}", file=sys.stderr)
        return 2
    if code == 0 and "torch.distributed" in sys.modules:
        from megaloom.parallel.topology import leave_distributed

        leave_distributed()
    return code


PEER_FAILURE_EXIT_S = 10  # how long the exit after a peer failure may take before it is cut


def exit_within(seconds: float) -> None:
    """Make sure this process ends within `seconds`: after a peer hung, gloo's threads can
    stay blocked on it and Python's exit would wait for them forever, so a C-level watchdog
    (faulthandler's) prints where the exit is stuck and ends the process with status 1.
    A normal exit that finishes sooner keeps its own status, so torchrun still reports the
    rank that failed first."""
    faulthandler.dump_traceback_later(seconds, exit=True)
