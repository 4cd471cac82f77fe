"""Checkpoints: atomic, verifiable, and loadable without unpickling arbitrary objects.

Layout of a run directory::

    OUT/checkpoints/step_00000100/
        model.safetensors      full model weights (a tied lm_head is stored once, as embed)
        config.yaml            resolved megaloom config
        tokenizer.json         the tokenizer, when known
        trainer_state.json     step, data position, loss scaler, metadata (plain JSON)
        optimizer.pt           optimizer state + RNG states (tensors and numbers only)
        manifest.json          size and sha256 of every file above, written last
    OUT/checkpoints/latest     name of the newest complete checkpoint, moved last

A step directory is built under a temporary name and renamed when complete; `latest` moves
after that; only then are checkpoints beyond `keep_last` deleted. A crash at any point leaves
the last good checkpoint intact. `optimizer.pt` is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megaloom.config import Config, ConfigError, config_from_dict, read_yaml_mapping
from megaloom.errors import CheckpointError
from megaloom.model.gpt import GPT
from megaloom.utils.io import atomic_dir, atomic_write_text

STEP_DIR = re.compile(r"^step_(\d{8})$")
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
MANIFEST_FILE = "manifest.json"
LATEST = "latest"


# ----------------------------------------------------------------------------- model files


def model_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights with a tied `lm_head.weight` dropped (it is `embed.weight`)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def write_model_files(
    directory: Path, model: GPT, config: Config, tokenizer_path: str | Path | None
) -> None:
    """Write weights, config and tokenizer into an existing (temporary) directory."""
    save_file(model_state_dict(model), str(directory / MODEL_FILE), metadata={"format": "pt"})
    config.save(directory / CONFIG_FILE)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, directory / TOKENIZER_FILE)


def save_model_files(
    directory: str | Path, model: GPT, config: Config, tokenizer_path: str | Path | None = None
) -> Path:
    """Atomically write a weights-only checkpoint that `load_model` can read."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        write_model_files(tmp, model, config, tokenizer_path)
        write_manifest(tmp)
    return directory


# ----------------------------------------------------------------------------- training state


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: GPT,
    config: Config,
    tokenizer_path: str | Path | None,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Save everything needed to resume exactly after `step`; return the checkpoint path."""
    root = Path(out_dir) / "checkpoints"
    name = step_dir_name(step)
    with atomic_dir(root / name) as tmp:
        write_model_files(tmp, model, config, tokenizer_path)
        torch.save(
            {"optimizer": optimizer.state_dict(), "rng": capture_rng_state()},
            tmp / OPTIMIZER_FILE,
        )
        atomic_write_text(tmp / STATE_FILE, json.dumps({"step": step, **trainer_state}, indent=2))
        write_manifest(tmp)
    atomic_write_text(root / LATEST, name + "\n")
    prune_checkpoints(root, keep_last)
    return root / name


def load_checkpoint(
    path: str | Path, model: GPT, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore weights, optimizer and RNG state from a checkpoint; return its trainer state."""
    directory = resolve_checkpoint(path)
    verify_manifest(directory)
    load_weights(model, directory)
    blob = _read(directory / OPTIMIZER_FILE,
                 lambda p: torch.load(p, map_location="cpu", weights_only=True))
    try:
        optimizer.load_state_dict(blob["optimizer"])
    except (ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{directory}: optimizer state does not match the model: {exc}") from exc
    restore_rng_state(blob["rng"])
    return _read(directory / STATE_FILE, lambda p: json.loads(p.read_text()))


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def capture_rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.accelerator.is_available():
        index = torch.accelerator.current_device_index()
        state["accelerator"] = torch.get_device_module().get_rng_state(index)
    return state


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "accelerator" in state and torch.accelerator.is_available():
        index = torch.accelerator.current_device_index()
        torch.get_device_module().set_rng_state(state["accelerator"], index)


def prune_checkpoints(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- loading


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under a run dir or its `checkpoints/` dir, if any."""
    root = Path(root)
    for candidate in (root / "checkpoints", root):
        pointer = candidate / LATEST
        if pointer.is_file():
            target = candidate / pointer.read_text().strip()
            if not target.is_dir():
                raise CheckpointError(f"{pointer} names {target.name}, which does not exist")
            return target
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run dir, a `checkpoints/` dir or a step dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / MODEL_FILE).is_file():
        return path
    latest = find_latest(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint in {path} (expected {MODEL_FILE} or {LATEST})")
    return latest


def load_config_file(directory: Path) -> Config:
    try:
        return config_from_dict(read_yaml_mapping(directory / CONFIG_FILE)).validate()
    except ConfigError as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {exc}") from exc


def load_weights(model: GPT, directory: Path) -> None:
    """Copy the checkpoint's weights into `model`, checking names and shapes."""
    state = _read(directory / MODEL_FILE, load_file)
    expected = model_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{directory / MODEL_FILE} does not match the model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{directory / MODEL_FILE}: {name} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=not model.config.tie_embeddings)


def load_model(
    spec: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPT, Config, Path | None]:
    """Load a model for inference or fine-tuning.

    `spec` is a run directory, a `checkpoints/` directory, a step directory, or `hf:DIR` for a
    Hugging Face GPT-2/Llama checkpoint. Returns (model in eval mode, config, tokenizer path).
    """
    text = str(spec)
    if text.startswith("hf:"):
        from megaloom.interop.hf import load_hf_model

        model, config, tokenizer = load_hf_model(text[3:], device=device)
        return model.eval(), config, (Path(tokenizer) if tokenizer else None)
    directory = resolve_checkpoint(spec)
    verify_manifest(directory)
    config = load_config_file(directory)
    with torch.device(device):
        model = GPT(config.model)
    load_weights(model, directory)
    tokenizer = directory / TOKENIZER_FILE
    return model.eval(), config, (tokenizer if tokenizer.is_file() else None)


# ----------------------------------------------------------------------------- integrity


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2))


def verify_manifest(directory: Path) -> None:
    """Raise `CheckpointError` when a file is missing, truncated or altered."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} is incomplete: no {MANIFEST_FILE}")
    manifest = _read(manifest_path, lambda p: json.loads(p.read_text()))
    for name, info in manifest.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory} is incomplete: {name} is missing")
        if path.stat().st_size != info["bytes"] or _sha256(path) != info["sha256"]:
            raise CheckpointError(f"{path} is corrupted (size or checksum differs)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(path: Path, reader):
    """Run `reader(path)`, turning any parse failure into a `CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        return reader(path)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError,
            pickle.UnpicklingError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
