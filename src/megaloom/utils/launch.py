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


def relaunch_under_torchrun(nproc: int, command_line: list[str]) -> int:
    """Run `megaloom COMMAND_LINE` with `nproc` ranks on this machine; return its exit code.

    The megaloom arguments follow `--` so torchrun does not take options like `--n` for its own.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "--", "megaloom", *command_line]
    log.info("launching: %s", " ".join(command))
    return subprocess.call(command)
