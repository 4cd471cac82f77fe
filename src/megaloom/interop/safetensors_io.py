"""Hugging Face weight files: one `model.safetensors`, or shards listed in
`model.safetensors.index.json`, read into and written from a flat name -> tensor dict.

Owns only the file layout (shard planning, the index, size parsing); it knows nothing about
model architectures. Reading checks that the index and the shards agree; writing clones one
shard at a time (so views of model parameters never share storage in a file) and lays files
out as `transformers.save_pretrained` does.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from megaloom.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 1000**3

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as `"5GB"`, `"500MB"`, `"2GiB"` or `"1000"`."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise CheckpointError(f"invalid shard size {size!r}; use e.g. 5GB, 500MB or 2GiB")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    if value <= 0:
        raise CheckpointError(f"shard size must be positive, got {size!r}")
    return value


def read_hf_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face model directory (single file or sharded)."""
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        return _read_sharded(index_path)
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return _read_file(single)
    if any(directory.glob("pytorch_model*.bin")):
        raise CheckpointError(
            f"{directory}: only PyTorch .bin weights found; megaloom reads safetensors "
            f"(re-save the model with `save_pretrained(..., safe_serialization=True)`)"
        )
    raise CheckpointError(f"{directory}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file: {exc}") from exc


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from exc
    tensors: dict[str, torch.Tensor] = {}
    shards = sorted(set(weight_map.values()))
    for shard in tqdm(shards, desc="reading shards", unit="shard", disable=None):
        path = index_path.parent / shard
        if not path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard} is missing")
        for name, tensor in _read_file(path).items():
            if weight_map.get(name) != shard:
                raise CheckpointError(f"{path}: tensor {name!r} is not listed for this shard in "
                                      f"{index_path.name}")
            tensors[name] = tensor
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index_path}: tensors listed but not found in shards: "
                              f"{', '.join(missing[:5])}")
    return tensors


def write_hf_weights(
    tensors: dict[str, torch.Tensor],
    directory: str | Path,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> list[Path]:
    """Write `tensors` as `model.safetensors`, or as `model-0000k-of-0000n.safetensors` shards
    plus `model.safetensors.index.json` when they exceed `max_shard_size`. Returns the files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    current = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and current + size > limit:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    count = len(shards)
    names = [WEIGHTS_NAME] if count == 1 else [
        f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)
    ]
    written = []
    for file_name, shard in tqdm(list(zip(names, shards, strict=True)), desc="writing shards",
                                 unit="shard", disable=None):
        data = {name: tensors[name].detach().to("cpu").contiguous().clone() for name in shard}
        save_file(data, str(directory / file_name), metadata={"format": "pt"})
        written.append(directory / file_name)
    if count > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {name: file_name for file_name, shard in zip(names, shards, strict=True)
                           for name in shard},
        }
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        written.append(directory / INDEX_NAME)
    log.debug("wrote %d tensors in %d file(s)", len(tensors), count)
    return written
