"""On-disk cache of dataset index arrays, keyed by a hash of everything they depend on.

Each entry is a directory `{cache_dir}/{name}-{hash}/` holding one `.npy` per array and a
`key.json` describing what it was built from. It is written atomically (a crash leaves no
entry) and loaded memory-mapped, so reusing it costs no time and little memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from megaloom.utils.io import atomic_dir

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Identity of an input file for cache keys: resolved path, size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cached_arrays(cache_dir: str | Path | None, name: str, key: dict[str, Any],
                  build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load the arrays cached under `key`, or `build()` them and cache them.

    With `cache_dir` None nothing touches the disk.
    """
    if cache_dir is None:
        return build()
    text = json.dumps({"version": CACHE_VERSION, **key}, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    entry = Path(cache_dir) / f"{name}-{digest}"
    if not (entry / "key.json").is_file():
        arrays = build()
        if (entry / "key.json").is_file():  # another process (rank) finished first
            return arrays
        with atomic_dir(entry) as tmp:
            for array_name, array in arrays.items():
                np.save(tmp / f"{array_name}.npy", array)
            (tmp / "key.json").write_text(text + "\n", encoding="utf-8")
        logger.info("cached index arrays in %s", entry)
    else:
        logger.debug("reusing cached index arrays in %s", entry)
    return {p.stem: np.load(p, mmap_mode="r") for p in sorted(entry.glob("*.npy"))}
