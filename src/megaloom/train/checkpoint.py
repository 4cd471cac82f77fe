"""Run-directory checkpoints: atomic, verifiable, sharded per rank, loadable under any layout.

Layout of a run directory::

    OUT/checkpoints/step_00000100/
        shard_00000.safetensors  rank 0's chunks of weights and AdamW moments (+ RNG state)
        shard_00001.safetensors  ... one file per rank that holds something to write
        config.yaml              resolved megaloom config
        tokenizer.json           the tokenizer, when known
        trainer_state.json       step, data position, loss scaler, AdamW step count, layout
        manifest.json            size and sha256 of every file above, written last
    OUT/checkpoints/latest       name of the newest complete checkpoint, moved last

`save_checkpoint` is collective: rank 0 makes `.step_NNNNNNNN.tmp`, every rank writes its own
shard file there (in parallel; no rank gathers the model) and hashes it, rank 0 writes the side
files and the manifest, renames the directory into place, moves `latest`, and only then
prunes checkpoints beyond `keep_last` (never the one `latest` names). A crash or a failed rank
at any point leaves the last good checkpoint intact; leftover temporaries are removed on the
next save. Shard files are plain safetensors (`megaloom.checkpoint.shards`), so loading never
unpickles anything; every file is checked against the manifest before it is read, and a
missing, truncated or altered file is reported by name.

Weights-only checkpoints (`save_model_files`, HF import) and checkpoints of earlier versions
hold `model.safetensors` (+ `optimizer.pt`, read with `torch.load(weights_only=True)`); they
load through the same `open_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import save_file

from megaloom.checkpoint.shards import (
    SHARD_GLOB,
    Chunk,
    ShardWriter,
    TensorStore,
    index_shards,
    shard_file_name,
    stored_name,
)
from megaloom.config import Config, ConfigError, ModelConfig, config_from_dict, read_yaml_mapping
from megaloom.errors import CheckpointError
from megaloom.model.gpt import GPT
from megaloom.model.init import Box, full_box
from megaloom.utils.io import atomic_dir, atomic_write_text, fsync_dir

STEP_DIR = re.compile(r"^step_(\d{8})$")
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
MANIFEST_FILE = "manifest.json"
LATEST = "latest"
STATE_KEYS = ("exp_avg", "exp_avg_sq")


# ----------------------------------------------------------------------------- weights only


def model_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights with a tied `lm_head.weight` dropped (it is `embed.weight`)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tied_head:
        state.pop("lm_head.weight", None)
    return state


def write_model_files(
    directory: Path, model: GPT, config: Config, tokenizer_path: str | Path | None
) -> None:
    """Write weights, config and tokenizer into an existing (temporary) directory."""
    save_file(model_state_dict(model), str(directory / MODEL_FILE), metadata={"format": "pt"})
    write_side_files(directory, config, tokenizer_path)


def write_side_files(directory: Path, config: Config, tokenizer_path: str | Path | None) -> None:
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
    add_chunks: Callable[[ShardWriter], None],
    config: Config,
    tokenizer_path: str | Path | None,
    trainer_state: dict[str, Any],
    keep_last: int,
    group: dist.ProcessGroup | None = None,
) -> Path:
    """Save this rank's part of the state after `step` (collective over `group`, all ranks,
    when a process group is initialised); return the checkpoint path on every rank.

    `add_chunks(writer)` adds the chunks this rank owns (weights, optimizer moments)."""
    root = Path(out_dir) / "checkpoints"
    name = step_dir_name(step)
    tmp = root / f".{name}.tmp"
    rank, world = _rank_world()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_leftovers(root)
        tmp.mkdir()
    if world > 1:
        dist.barrier(group=group)
    try:
        writer = ShardWriter()
        add_chunks(writer)
        if rank == 0:
            add_rng_chunks(writer)
        mine: dict | str = {}
        if writer.tensors:
            path = tmp / shard_file_name(rank)
            mine = {path.name: writer.write(path)}
    except Exception as exc:  # every rank must reach the gather, whatever failed
        mine = f"rank {rank}: {exc}"
    entries = _gather(mine, world, group)
    outcome: list = [None]
    if rank == 0:
        outcome[0] = _finish_save(root, name, tmp, entries, config, tokenizer_path,
                                  {"step": step, **trainer_state}, keep_last)
    if world > 1:
        dist.broadcast_object_list(outcome, src=0, group=group)
    if not isinstance(outcome[0], Path):
        raise CheckpointError(f"saving checkpoint {root / name} failed: {outcome[0]}")
    return outcome[0]


def _finish_save(root: Path, name: str, tmp: Path, entries: list, config: Config,
                 tokenizer_path, state: dict, keep_last: int) -> Path | str:
    """Rank 0: side files, manifest, rename, `latest`, pruning; an error message on failure."""
    errors = [e for e in entries if isinstance(e, str)]
    try:
        if errors:
            return "; ".join(errors)
        write_side_files(tmp, config, tokenizer_path)
        atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2))
        manifest = {k: v for e in entries for k, v in e.items()}
        for path in tmp.iterdir():
            if path.name not in manifest:
                manifest[path.name] = file_entry(path)
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps(dict(sorted(manifest.items())),
                                                          indent=2))
        final, old = root / name, root / f".{name}.old.tmp"
        if final.exists():  # the same step saved again: keep the old one until the new is in
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(root / LATEST, name + "\n")
        prune_checkpoints(root, keep_last)
        return final
    except OSError as exc:
        return f"rank 0: {exc}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj, world: int, group: dist.ProcessGroup | None) -> list:
    if world == 1:
        return [obj]
    out = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=group)
    return out or []


def remove_leftovers(root: Path) -> None:
    """Delete temporaries of interrupted saves (`.step_*.tmp`, `.latest.*.tmp`)."""
    for path in root.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def capture_rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.accelerator.is_available():
        index = torch.accelerator.current_device_index()
        state["accelerator"] = torch.get_device_module().get_rng_state(index)
    return state


def add_rng_chunks(writer: ShardWriter) -> None:
    for kind, tensor in capture_rng_state().items():
        writer.add(f"rng/{kind}", tuple(tensor.shape), full_box(tensor.shape), tensor)


def restore_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "accelerator" in state and torch.accelerator.is_available():
        index = torch.accelerator.current_device_index()
        torch.get_device_module().set_rng_state(state["accelerator"], index)


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete the oldest step directories beyond `keep_last`, never the one `latest` names."""
    current = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    steps = sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))
    for old in steps[:-keep_last]:
        if old.name != current:
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
    if (path / MODEL_FILE).is_file() or (path / MANIFEST_FILE).is_file():
        return path
    latest = find_latest(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint in {path} (expected {MANIFEST_FILE} or {LATEST})")
    return latest


def load_config_file(directory: Path) -> Config:
    try:
        return config_from_dict(read_yaml_mapping(directory / CONFIG_FILE)).validate()
    except ConfigError as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: {exc}") from exc


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
            plain = GPT(checkpoint.config.model)
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
    state = (_read(directory / STATE_FILE, lambda p: json.loads(p.read_text()))
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
    blob = _read(path, lambda p: torch.load(p, map_location="cpu", weights_only=True))
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
    """Parameter names of the single-process `GPT`, per AdamW group, in `train.optim` order
    (how `optimizer.pt` of earlier versions numbers its state)."""
    from megaloom.train.optim import parameter_groups

    with torch.device("meta"):
        plain = GPT(config)
    names = {id(p): n for n, p in plain.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in parameter_groups(plain, 0.0)]


def open_weights(spec: str | Path) -> tuple[Config, Path | None, object]:
    """(config, tokenizer path, `TensorSource` of the weights) of anything `load_model`
    accepts; a megaloom checkpoint is read box by box (each rank reads only its slices, LoRA
    adapters merged in), a Hugging Face directory parameter by parameter."""
    text = str(spec)
    if text.startswith("hf:"):
        from megaloom.interop.hf import HFSource, hf_model_config

        config, tokenizer = hf_model_config(text[3:])
        return config, (Path(tokenizer) if tokenizer else None), HFSource(text[3:],
                                                                          config.model)
    from megaloom.finetune.lora import merged_source

    checkpoint = open_checkpoint(spec)
    return checkpoint.config, checkpoint.tokenizer, merged_source(checkpoint, checkpoint.config)


def load_model(
    spec: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPT, Config, Path | None]:
    """Load a whole model for inference or export, in one process.

    `spec` is a run directory, a `checkpoints/` directory, a step directory, or `hf:DIR` for a
    Hugging Face GPT-2/Llama checkpoint. Returns (model in eval mode, config, tokenizer path).
    """
    from megaloom.parallel.build import build_shard
    from megaloom.parallel.topology import Topology

    text = str(spec)
    if text.startswith("hf:"):
        from megaloom.interop.hf import load_hf_model

        model, config, tokenizer = load_hf_model(text[3:], device=device)
        return model.eval(), config, (Path(tokenizer) if tokenizer else None)
    config, tokenizer, source = open_weights(spec)
    topo = Topology.build(device=torch.device(device), virtual=(1, 0))
    return build_shard(config.model, topo, source).eval(), config, tokenizer


# ----------------------------------------------------------------------------- integrity


def file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {p.name: file_entry(p) for p in files}
    atomic_write_text(directory / MANIFEST_FILE, json.dumps(manifest, indent=2))


def read_manifest(directory: Path) -> dict[str, dict]:
    """The manifest, after checking that every file it lists exists with its size."""
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} is incomplete: no {MANIFEST_FILE}")
    manifest = _read(manifest_path, lambda p: json.loads(p.read_text()))
    for name, info in manifest.items():
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


def _read(path: Path, reader):
    """Run `reader(path)`, turning any parse failure into a `CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        return reader(path)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError,
            pickle.UnpicklingError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
