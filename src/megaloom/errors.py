"""Exceptions for problems the user can fix; the CLI prints them as one line, no traceback."""

from __future__ import annotations

from megaloom.config import ConfigError


class MegaloomError(Exception):
    """Base class for user-fixable errors (bad input files, missing checkpoints, ...)."""


class DataError(MegaloomError):
    """Malformed or missing training data, naming the file (and line where known)."""


class CheckpointError(MegaloomError):
    """A missing, incomplete or corrupted checkpoint."""


USER_ERRORS: tuple[type[Exception], ...] = (MegaloomError, ConfigError, FileNotFoundError)
