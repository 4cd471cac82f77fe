"""Exceptions for problems the user can fix; the CLI prints them as one line, no traceback."""

from __future__ import annotations

import errno

from megaloom.config import ConfigError


class MegaloomError(Exception):
    """Base class for user-fixable errors (bad input files, missing checkpoints, ...)."""


class DataError(MegaloomError):
    """Malformed or missing training data, naming the file (and line where known)."""


class CheckpointError(MegaloomError):
    """A missing, incomplete or corrupted checkpoint."""


class PeerFailure(MegaloomError):
    """A collective failed in a multi-process run: a peer died, or hung longer than
    `parallel.timeout_s`. The CLI leaves the process at once after reporting it."""


USER_ERRORS: tuple[type[Exception], ...] = (MegaloomError, ConfigError, FileNotFoundError)


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` is a write that failed for lack of space (an `OSError` with ENOSPC, or a
    library error that passes the system's message on, as safetensors does)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


def describe_failure(exc: BaseException) -> str:
    """One line for a failed write: "disk full: ..." when it is one, else the message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"disk full: {text}" if is_disk_full(exc) else text
