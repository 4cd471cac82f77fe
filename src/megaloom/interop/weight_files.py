"""Hugging Face weight files, read into and written from a flat name -> tensor dict.

Reads one `model.safetensors` or the shards listed in `model.safetensors.index.json`, and,
for older checkpoints, `pytorch_model.bin` or its sharded `pytorch_model.bin.index.json` form
(loaded with `torch.load(weights_only=True)`, which refuses anything but tensors, so a .bin
file cannot run code). safetensors wins when a directory has both. Writes safetensors only.

Owns only the file layout (shard planning, the index, size parsing); it knows nothing about
model architectures. Reading checks that the index and the shards agree; writing clones one
shard at a time (so views of model parameters never share storage in a file) and lays files
out as `transformers.save_pretrained` does.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from megaloom.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
BIN_WEIGHTS_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
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
    for single, index, reader in _FORMATS:
        if (directory / index).is_file():
            return _read_sharded(directory / index, reader)
        if (directory / single).is_file():
            return reader(directory / single)
    raise CheckpointError(f"{directory}: no weights found (looked for {WEIGHTS_NAME}, "
                          f"{INDEX_NAME}, {BIN_WEIGHTS_NAME} and {BIN_INDEX_NAME})")


class LazySafetensors(Mapping):
    """Tensors of safetensors files by name, each read from its file only when looked up
    (headers are read up front)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self.files[name]
        try:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read {name}: {exc}") from exc

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def open_hf_weights(directory: str | Path) -> Mapping[str, torch.Tensor]:
    """Like `read_hf_weights`, but safetensors tensors are read only when looked up, one at a
    time (for building one rank's shard); `.bin` checkpoints are read whole."""
    directory = Path(directory)
    if (directory / INDEX_NAME).is_file() or (directory / WEIGHTS_NAME).is_file():
        files = _safetensors_shards(directory)
        names: dict[str, Path] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as handle:
                    names.update({name: path for name in handle.keys()})  # noqa: SIM118
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot read safetensors file: {exc}") from exc
        return LazySafetensors(names)
    return read_hf_weights(directory)


def _safetensors_shards(directory: Path) -> list[Path]:
    if not (directory / INDEX_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    index_path = directory / INDEX_NAME
    files = [directory / shard for shard in sorted(set(_weight_map(index_path).values()))]
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{index_path}: shard {path.name} is missing")
    return files


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file: {exc}") from exc


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: cannot read PyTorch weights file (only plain tensor "
                              f"state dicts are accepted): {exc}") from exc
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: not a state dict of named tensors")
    return state


_FORMATS = ((WEIGHTS_NAME, INDEX_NAME, _read_safetensors),
            (BIN_WEIGHTS_NAME, BIN_INDEX_NAME, _read_bin))


def _weight_map(index_path: Path) -> dict[str, str]:
    """Tensor name -> shard file of a `*.index.json`."""
    try:
        return json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path}: not a valid weights index ({exc})") from exc


def _read_sharded(index_path: Path, reader: Callable[[Path], dict[str, torch.Tensor]]
                  ) -> dict[str, torch.Tensor]:
    weight_map = _weight_map(index_path)
    tensors: dict[str, torch.Tensor] = {}
    shards = sorted(set(weight_map.values()))
    for shard in tqdm(shards, desc="reading shards", unit="shard", disable=None):
        path = index_path.parent / shard
        if not path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard} is missing")
        for name, tensor in reader(path).items():
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
    tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    directory: str | Path,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    sizes: dict[str, int] | None = None,
) -> list[Path]:
    """Write `tensors` as `model.safetensors`, or as `model-0000k-of-0000n.safetensors` shards
    plus `model.safetensors.index.json` when they exceed `max_shard_size`. Returns the files.

    `tensors` is a dict, or an iterator of (name, tensor) in the order of `sizes` (name ->
    bytes): each file is then written as soon as its tensors have arrived, so memory stays
    bounded by one file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if sizes is None:
        sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
        tensors = tensors.items()
    items = iter(tensors)
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = [[]]
    current = 0
    for name, size in sizes.items():
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
        data = {}
        for expected in shard:
            name, tensor = next(items)
            if name != expected:
                raise ValueError(f"tensor {name!r} arrived where {expected!r} was planned")
            data[name] = tensor.detach().to("cpu").contiguous().clone()
        save_file(data, str(directory / file_name), metadata={"format": "pt"})
        written.append(directory / file_name)
        del data
    if count > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {name: file_name for file_name, shard in zip(names, shards, strict=True)
                           for name in shard},
        }
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        written.append(directory / INDEX_NAME)
    log.debug("wrote %d tensors in %d file(s)", len(sizes), count)
    return written
