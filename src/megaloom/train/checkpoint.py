"""Saving run-directory checkpoints: atomic, verifiable, sharded per rank, loadable under any
layout (reading them: `megaloom.checkpoint.reader`).

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
prunes checkpoints beyond `keep_last` (never the one `latest` names). Ranks waiting for another
one's work (rank 0's directory, everyone's shards, rank 0's commit) wait as long as it takes,
over the patient group; the rank whose work they wait for waits at most `timeout` for them, so a
peer that hangs during a save fails the run within `parallel.timeout_s` as it would in a step.
A crash or a failed rank at any point leaves the last good checkpoint intact; leftover
temporaries are removed on the next save. Shard files are plain safetensors
(`megaloom.checkpoint.shards`), so loading never unpickles anything; every file is checked
against the manifest before it is read, and a missing, truncated or altered file is reported by
name.

Weights-only checkpoints (`megaloom.checkpoint.files.save_model_files`, HF import) and
checkpoints of earlier versions hold `model.safetensors` (+ `optimizer.pt`, read with
`torch.load(weights_only=True)`); they load through the same `open_checkpoint`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megaloom.checkpoint.files import (
    LATEST,
    MANIFEST_FILE,
    STATE_FILE,
    file_entry,
    write_side_files,
)
from megaloom.checkpoint.reader import STEP_DIR
from megaloom.checkpoint.shards import ShardWriter, shard_file_name
from megaloom.config import Config
from megaloom.errors import CheckpointError, describe_failure
from megaloom.model.init import full_box
from megaloom.utils.io import atomic_write_text, fsync_dir


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    add_chunks: Callable[[ShardWriter], None],
    config: Config,
    tokenizer_path: str | Path | None,
    trainer_state: dict[str, Any],
    keep_last: int,
    group: dist.ProcessGroup | None = None,
    timeout: timedelta | None = None,
) -> Path:
    """Save this rank's part of the state after `step` (collective over `group`, all ranks,
    when a process group is initialised); return the checkpoint path on every rank. Rank 0
    waits at most `timeout` for the others once its own part is done.

    `add_chunks(writer)` adds the chunks this rank owns (weights, optimizer moments)."""
    root = Path(out_dir) / "checkpoints"
    name = step_dir_name(step)
    tmp = root / f".{name}.tmp"
    rank, world = _rank_world()
    mine: dict | str = {}
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            remove_leftovers(root)
            tmp.mkdir()
        except OSError as exc:
            mine = f"rank 0: {describe_failure(exc)}"
    if world > 1:
        _wait(dist.barrier(group=group, async_op=True), rank, timeout)
    if not mine:
        mine = _write_own_shard(add_chunks, tmp, rank)
    entries = _gather(mine, world, group)
    failure = None
    if rank == 0:
        outcome = _finish_save(root, name, tmp, entries, config, tokenizer_path,
                               {"step": step, **trainer_state}, keep_last)
        failure = None if isinstance(outcome, Path) else outcome
    if world > 1:
        failure = _share_failure(failure, rank, group, timeout)
    if failure is not None:
        raise CheckpointError(f"saving checkpoint {root / name} failed: {failure}")
    return root / name


FAILURE_BYTES = 4096


def _wait(work: dist.Work, rank: int, timeout: timedelta | None) -> None:
    """Rank 0 (whose work the others waited for) waits at most `timeout`; the rest wait."""
    if rank == 0 and timeout is not None:
        work.wait(timeout)
    else:
        work.wait()


def _share_failure(failure: str | None, rank: int, group: dist.ProcessGroup | None,
                   timeout: timedelta | None) -> str | None:
    """Rank 0's failure message (None: the save is committed) on every rank."""
    message = torch.zeros(FAILURE_BYTES, dtype=torch.uint8)
    if rank == 0 and failure is not None:
        data = failure.encode("utf-8")[:FAILURE_BYTES - 1]
        message[0] = 1
        message[1:1 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    _wait(dist.broadcast(message, src=0, group=group, async_op=True), rank, timeout)
    if not message[0]:
        return None
    return bytes(message[1:].tolist()).rstrip(b"\0").decode("utf-8", errors="replace")


def _write_own_shard(add_chunks: Callable[[ShardWriter], None], tmp: Path,
                     rank: int) -> dict | str:
    """This rank's shard file (its manifest entry), or the failure as one line: every rank
    must reach the gather that follows, whatever failed."""
    try:
        writer = ShardWriter()
        add_chunks(writer)
        if rank == 0:
            add_rng_chunks(writer)
        if not writer.tensors:
            return {}
        path = tmp / shard_file_name(rank)
        return {path.name: writer.write(path)}
    except Exception as exc:
        return f"rank {rank}: {describe_failure(exc)}"


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
        return f"rank 0: {describe_failure(exc)}"
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
