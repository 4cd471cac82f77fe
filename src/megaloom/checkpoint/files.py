"""The files of a checkpoint directory, below the trainer, the loaders and the converters:
their names, the manifest (size and SHA-256 of every file), weights-only writing, and reading
each side file with its schema checked, so a damaged file is refused with its name.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from megaloom.checkpoint.shards import SHARD_GLOB
from megaloom.config import Config, ConfigError, config_from_dict, read_yaml_mapping
from megaloom.errors import CheckpointError, describe_failure
from megaloom.utils.io import atomic_dir, atomic_write_text

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
MANIFEST_FILE = "manifest.json"
LATEST = "latest"

T = TypeVar("T")


# ----------------------------------------------------------------------------- weights only


def model_state_dict(model: nn.Module) -> dict[str, Any]:
    """The model's weights with a tied `lm_head.weight` dropped (it is `embed.weight`)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tied_head:
        state.pop("lm_head.weight", None)
    return state


def write_model_files(directory: Path, model: nn.Module, config: Config,
                      tokenizer_path: str | Path | None) -> None:
    """Write weights, config and tokenizer into an existing (temporary) directory."""
    save_file(model_state_dict(model), str(directory / MODEL_FILE), metadata={"format": "pt"})
    write_side_files(directory, config, tokenizer_path)


def write_side_files(directory: Path, config: Config, tokenizer_path: str | Path | None) -> None:
    config.save(directory / CONFIG_FILE)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, directory / TOKENIZER_FILE)


def save_model_files(directory: str | Path, model: nn.Module, config: Config,
                     tokenizer_path: str | Path | None = None,
                     side_files: dict[str, str] | None = None) -> Path:
    """Atomically write a weights-only checkpoint that `megaloom.loading.load_model` reads,
    with `side_files` (name: text) beside the weights, in the manifest."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        write_model_files(tmp, model, config, tokenizer_path)
        for name, text in (side_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        write_manifest(tmp)
    return directory


# ----------------------------------------------------------------------------- side files


def read_checked(path: Path, reader: Callable[[Path], T]) -> T:
    """Run `reader(path)`, turning any parse failure into a `CheckpointError` naming `path`."""
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        return reader(path)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError,
            pickle.UnpicklingError) as exc:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"cannot read {path}: {describe_failure(exc)}") from exc


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object."""
    data = read_checked(path, lambda p: json.loads(p.read_text(encoding="utf-8")))
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_config_file(directory: Path) -> Config:
    try:
        return config_from_dict(read_yaml_mapping(directory / CONFIG_FILE)).validate()
    except ConfigError as exc:
        path = directory / CONFIG_FILE
        raise CheckpointError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from exc


_STATE_FIELDS: dict[str, tuple[type, ...]] = {
    "step": (int,), "consumed_samples": (int,), "skipped_steps": (int,),
    "adam_steps": (int, type(None)), "loss_scaler": (dict, type(None)), "layout": (dict,),
}


def read_trainer_state(path: Path) -> dict[str, Any]:
    """`trainer_state.json`: an object with a non-negative integer `step`, and the other
    fields the trainer writes of their types when present."""
    state = read_json_object(path)
    if "step" not in state:
        raise CheckpointError(f"{path}: no 'step' (not a megaloom trainer state)")
    for key, types in _STATE_FIELDS.items():
        value = state.get(key)
        if key in state and (not isinstance(value, types) or isinstance(value, bool)):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise CheckpointError(f"{path}: {key!r} must be {names}, got {value!r}")
    if state["step"] < 0:
        raise CheckpointError(f"{path}: 'step' must be >= 0, got {state['step']}")
    return state


# ----------------------------------------------------------------------------- integrity


def file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {p.name: file_entry(p) for p in files}
    atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2))


def read_manifest(directory: Path) -> dict[str, dict]:
    """The manifest, after checking its schema and that every file it lists exists with its
    size."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} is incomplete: no {MANIFEST_FILE}")
    manifest = read_json_object(manifest_path)
    for name, info in manifest.items():
        _check_entry(manifest_path, name, info)
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory} is incomplete: {name} is missing")
        if path.stat().st_size != info["bytes"]:
            raise CheckpointError(f"{path} is corrupted (truncated or extended: "
                                  f"{path.stat().st_size} bytes, expected {info['bytes']})")
    shards = {p.name for p in directory.glob(SHARD_GLOB)}
    if shards - set(manifest):
        raise CheckpointError(f"{directory}: {sorted(shards - set(manifest))[0]} is not in "
                              f"{MANIFEST_FILE}")
    return manifest


def _check_entry(manifest_path: Path, name: str, info: Any) -> None:
    """One manifest entry: a plain file name mapped to {"bytes": int >= 0, "sha256": hex}."""
    where = f"{manifest_path}: entry {name!r}"
    if Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(f"{where} is not a file name in the checkpoint directory")
    if not isinstance(info, dict):
        raise CheckpointError(f"{where} must be an object with 'bytes' and 'sha256', got "
                              f"{type(info).__name__}")
    size, digest = info.get("bytes"), info.get("sha256")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise CheckpointError(f"{where}: 'bytes' must be an integer >= 0, got {size!r}")
    if not isinstance(digest, str) or len(digest) != 64:
        raise CheckpointError(f"{where}: 'sha256' must be 64 hex digits, got {digest!r}")


def check_file(path: Path, manifest: dict[str, dict]) -> None:
    """Raise `CheckpointError` when `path` differs from its manifest entry."""
    info = manifest.get(path.name)
    if info is None:
        raise CheckpointError(f"{path.name} is not in {path.parent / MANIFEST_FILE}")
    if path.stat().st_size != info["bytes"] or _sha256(path) != info["sha256"]:
        raise CheckpointError(f"{path} is corrupted (size or checksum differs)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
