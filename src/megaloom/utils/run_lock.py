"""One run per output directory: an advisory lock on `OUT/.megaloom.lock` that names its
holder's PID.

The lock is `flock`, so the kernel releases it when the holding process exits, however it
exits: a crashed or killed run never leaves a stale lock behind (the PID written in the file
is only there to name the holder). A launcher that holds it (`--nproc N` relaunching under
torchrun) tells its ranks through the environment, so they do not try to take it again; under
a torchrun started by hand, global rank 0 takes it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megaloom.errors import MegaloomError
from megaloom.utils.launch import Launch

LOCK_FILE = ".megaloom.lock"
HELD_BY_PARENT = "MEGALOOM_LOCKED_OUT_DIR"


@contextmanager
def hold_output_dir(out_dir: str | Path) -> Iterator[None]:
    """Hold the lock on `out_dir` (created if missing) for the block, or fail with a line
    naming the PID of the run that holds it. A directory this call created and the run left
    empty (it failed before writing anything) is removed again."""
    directory = Path(out_dir).resolve()
    if (os.environ.get(HELD_BY_PARENT) == str(directory)
            or not Launch.from_environment().is_leader):
        yield
        return
    created = [d for d in (directory, *directory.parents) if not d.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(directory):
            yield
    finally:
        if created and [p.name for p in directory.iterdir()] == [LOCK_FILE]:
            (directory / LOCK_FILE).unlink()
            for path in created:  # innermost first
                path.rmdir()


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    with open(directory / LOCK_FILE, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise MegaloomError(f"{directory} is in use by another run (PID {holder}); wait "
                                "for it to finish or choose another output directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        previous = os.environ.get(HELD_BY_PARENT)
        os.environ[HELD_BY_PARENT] = str(directory)  # inherited by torchrun's ranks
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(HELD_BY_PARENT, None)
            else:
                os.environ[HELD_BY_PARENT] = previous
