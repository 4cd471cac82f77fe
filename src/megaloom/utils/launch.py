"""Re-running a megaloom command under `torchrun --standalone` for `--nproc N`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

log = logging.getLogger(__name__)


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting LOCAL_RANK)."""
    return "LOCAL_RANK" in os.environ


def relaunch_under_torchrun(nproc: int, command_line: list[str], max_restarts: int = 0) -> int:
    """Run `megaloom COMMAND_LINE` with `nproc` ranks on this machine; return its exit code.
    With `max_restarts`, torchrun restarts every rank (up to that many times) when one fails.

    The megaloom arguments follow `--` so torchrun does not take options like `--n` for its own.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}", "-m", "--",
               "megaloom", *command_line]
    log.info("launching: %s", " ".join(command))
    return subprocess.call(command)
