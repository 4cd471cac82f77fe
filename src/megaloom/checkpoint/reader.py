"""Opening a checkpoint directory for reading, under any layout: find it (`latest`), verify
it against its manifest, and expose its config, trainer state and tensors (`OpenCheckpoint`,
read box by box; `LazyState` for streaming conversions). Sharded checkpoints and the
single-file ones of earlier versions (`model.safetensors` + `optimizer.pt`) open the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megaloom.checkpoint.files import (
    CONFIG_FILE,
    LATEST,
    MANIFEST_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    TOKENIZER_FILE,
    check_file,
    load_config_file,
    read_checked,
    read_manifest,
    read_trainer_state,
)
from megaloom.checkpoint.shards import Chunk, TensorStore, index_shards, stored_name
from megaloom.config import Config, ModelConfig
from megaloom.errors import CheckpointError
from megaloom.model.init import Box, full_box
from megaloom.model.registry import build_model

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_KEYS = ("exp_avg", "exp_avg_sq")


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under a run dir or its `checkpoints/` dir, if any."""
    root = Path(root)
    for candidate in (root / "checkpoints", root):
        pointer = candidate / LATEST
        if pointer.is_file():
            name = read_checked(pointer, lambda p: p.read_text(encoding="utf-8")).strip()
            if not STEP_DIR.match(name):
                raise CheckpointError(f"{pointer} must name a step directory (step_NNNNNNNN), "
                                      f"got {name[:40]!r}")
            target = candidate / name
            if not target.is_dir():
                raise CheckpointError(f"{pointer} names {target.name}, which does not exist")
            return target
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a run dir, a `checkpoints/` dir or a step dir."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if (path / MODEL_FILE).is_file() or (path / MANIFEST_FILE).is_file():
        return path
    latest = find_latest(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint in {path} (expected {MANIFEST_FILE} or {LATEST})")
    return latest


@dataclass
class OpenCheckpoint:
    """A verified checkpoint directory: its config, trainer state and tensor store."""

    directory: Path
    config: Config
    state: dict[str, Any]
    store: TensorStore

    @property
    def tokenizer(self) -> Path | None:
        path = self.directory / TOKENIZER_FILE
        return path if path.is_file() else None

    def rng_state(self) -> dict[str, torch.Tensor] | None:
        kinds = [k.split("/", 1)[1] for k in self.store.shapes if k.startswith("rng/")]
        return {k: self.store.read(f"rng/{k}") for k in kinds} or None

    def read(self, name: str, shape: tuple[int, ...], box: Box) -> torch.Tensor:
        """`TensorSource` of the model weights: the box of parameter `name`."""
        if name not in self.store:
            raise CheckpointError(f"{self.directory} does not match the model: no tensor "
                                  f"{name!r}")
        if self.store.shapes[name] != tuple(shape):
            raise CheckpointError(f"{self.directory}: {name} has shape "
                                  f"{self.store.shapes[name]}, the model expects {tuple(shape)}")
        return self.store.read(name, box)


class LazyState(Mapping):
    """A checkpoint's weights as the plain model's state dict whose tensors are read, whole,
    only when looked up (a tied head reads the embedding; LoRA adapters are merged unless
    `merge` is false): for streaming conversions."""

    def __init__(self, checkpoint: OpenCheckpoint, merge: bool = True):
        from megaloom.finetune.lora import merged_source

        self.checkpoint = checkpoint
        self.source = merged_source(checkpoint, checkpoint.config) if merge else checkpoint
        with torch.device("meta"):
            plain = build_model(checkpoint.config.model)
        self.shapes = {k: tuple(v.shape) for k, v in plain.state_dict().items()}
        self.dtype = plain.embed.weight.dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        return self.source.read(stored_name(name, self.checkpoint.config.model), shape,
                                full_box(shape))

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def open_checkpoint(spec: str | Path) -> OpenCheckpoint:
    """Open a run dir / checkpoints dir / step dir; files are checked against the manifest
    (sizes now, checksums before each file is first read)."""
    directory = resolve_checkpoint(spec)
    manifest = read_manifest(directory)
    for name in (CONFIG_FILE, STATE_FILE):
        if name in manifest:
            check_file(directory / name, manifest)
    config = load_config_file(directory)
    state = (read_trainer_state(directory / STATE_FILE)
             if (directory / STATE_FILE).is_file() else {})
    checked: set[Path] = set()
    if (directory / MODEL_FILE).is_file():
        store = _legacy_store(directory, manifest)
        checked.add(directory / MODEL_FILE)
        legacy = _read_legacy_optimizer(directory, manifest, config.model, store)
        state = {**state, **legacy}
    else:
        store = index_shards(directory)
    store.on_first_read = lambda path: path in checked or check_file(path, manifest)
    return OpenCheckpoint(directory, config, state, store)


def _legacy_store(directory: Path, manifest: dict) -> TensorStore:
    check_file(directory / MODEL_FILE, manifest)
    store = TensorStore(str(directory / MODEL_FILE))
    store.add_safetensors(directory / MODEL_FILE)
    return store


def _read_legacy_optimizer(directory: Path, manifest: dict, config: ModelConfig,
                           store: TensorStore) -> dict[str, Any]:
    """Chunks of a single-process `optimizer.pt` (plain AdamW state + RNG), when present."""
    path = directory / OPTIMIZER_FILE
    if not path.is_file():
        return {}
    check_file(path, manifest)
    blob = read_checked(path, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    try:
        saved = blob["optimizer"]
        names = [n for group in plain_order(config) for n in group]
        steps = None
        for index, state in saved["state"].items():
            for key in STATE_KEYS:
                tensor = state[key]
                store.add_chunk(f"{key}/{names[index]}", tuple(tensor.shape),
                                Chunk(full_box(tensor.shape), tensor=tensor))
            steps = int(state["step"].item())
        for kind, tensor in blob.get("rng", {}).items():
            store.add_chunk(f"rng/{kind}", tuple(tensor.shape),
                            Chunk(full_box(tensor.shape), tensor=tensor))
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a megaloom optimizer state ({exc})") from exc
    return {"adam_steps": steps}


def plain_order(config: ModelConfig) -> list[list[str]]:
    """Parameter names of the single-process model, per AdamW group, in `train.optim` order
    (how `optimizer.pt` of earlier versions numbers its state)."""
    from megaloom.train.optim import parameter_groups

    with torch.device("meta"):
        plain = build_model(config)
    names = {id(p): n for n, p in plain.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in parameter_groups(plain, 0.0)]
