"""What the launcher tells a process (`Launch`), and re-running a megaloom command under
`torchrun --standalone` for `--nproc N`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun job, as the launcher's environment variables say
    (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `TORCHELASTIC_RESTART_COUNT`); the one place they
    are read. A process started alone is rank 0 of a world of 1, attempt 0."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False
    attempt: int = 0

    @classmethod
    def from_environment(cls) -> Launch:
        env = os.environ
        return cls(rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")),
                   world_size=int(env.get("WORLD_SIZE", "1")), launched="LOCAL_RANK" in env,
                   attempt=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")))

    @property
    def is_leader(self) -> bool:
        """Rank 0 of the job (or the only process)."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This process's own accelerator of `device`'s type (one per local rank); the CPU
        stays the CPU."""
        if device.type == "cpu":
            return device
        return torch.device(device.type, self.local_rank)


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting LOCAL_RANK)."""
    return Launch.from_environment().launched


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
