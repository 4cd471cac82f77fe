"""Sharded tensor files: every rank writes the chunks it owns; any layout reads any box.

A checkpoint holds logical tensors by key (`embed.weight`, `exp_avg/embed.weight`, ...), each
with a global shape, stored as chunks (boxes of the global tensor) in `shard_RRRRR.safetensors`
files, one per writing rank, written in parallel. Each file's safetensors metadata maps its
chunk names to (key, global shape, offsets), so the files describe themselves and the index is
the union of their headers. Reading a box intersects it with the chunks and reads only the
overlapping slices (`safe_open` slicing; no file is loaded whole).

Why not `torch.distributed.checkpoint`: ZeRO-1 shards optimizer state as flat ranges of a
parameter group's concatenated tensors, which cut parameters at arbitrary elements. DTensor
placements cannot describe such pieces; a list of boxes can (a flat range of a row-major
matrix is at most three boxes). The files are plain safetensors, readable without megaloom.

Files are written by streaming each tensor's bytes (the safetensors layout: 8-byte header
length, JSON header, raw little-endian data), so saving holds no second copy of the state.
The single-file checkpoints of earlier versions (`model.safetensors` + `optimizer.pt`) are
read through the same `read(key, box)`, as one full chunk per tensor.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from megaloom.config import ModelConfig
from megaloom.errors import CheckpointError
from megaloom.model.init import Box, box_shape, full_box

SHARD_GLOB = "shard_*.safetensors"
CHUNKS_METADATA = "megaloom_chunks"
DTYPE_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}


def stored_name(name: str, config: ModelConfig) -> str:
    """The key a model parameter is stored under: a tied head is the token embedding."""
    return "embed.weight" if config.tied_head and name == "lm_head.weight" else name


def shard_file_name(rank: int) -> str:
    return f"shard_{rank:05d}.safetensors"


def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[Box]:
    """Boxes covering elements [start, stop) of a row-major tensor of `shape` (at most three:
    the tail of a first row, whole rows, the head of a last row). Tensors of more than two
    dimensions are viewed as (rows, rest)."""
    if stop <= start:
        return []
    if len(shape) <= 1:
        return [((start, stop),)]
    width = math.prod(shape[1:])
    if len(shape) > 2:
        if start % width or stop % width:
            raise ValueError(f"flat range [{start}, {stop}) cuts a row of a {shape} tensor")
        return [((start // width, stop // width), *full_box(shape[1:]))]
    boxes: list[Box] = []
    row, col = divmod(start, width)
    if col:
        end = min(stop, (row + 1) * width)
        boxes.append(((row, row + 1), (col, col + end - start)))
        start, row = end, row + 1
    full_rows = (stop - start) // width
    if full_rows:
        boxes.append(((row, row + full_rows), (0, width)))
        start, row = start + full_rows * width, row + full_rows
    if start < stop:
        boxes.append(((row, row + 1), (0, stop - start)))
    return boxes


def box_slices(box: Box, origin: Box) -> tuple[slice, ...]:
    """`box` as slices of a tensor that covers `origin`."""
    return tuple(slice(lo - o, hi - o) for (lo, hi), (o, _) in zip(box, origin, strict=True))


def intersect(a: Box, b: Box) -> Box | None:
    box = tuple((max(lo1, lo2), min(hi1, hi2)) for (lo1, hi1), (lo2, hi2) in zip(a, b, strict=True))
    return None if any(lo >= hi for lo, hi in box) else box


class ShardWriter:
    """Chunks of one rank, written as one safetensors file."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.index: dict[str, dict] = {}

    def add(self, key: str, global_shape: tuple[int, ...], box: Box,
            tensor: torch.Tensor) -> None:
        """Store `tensor` as the `box` of the global tensor `key`."""
        if tuple(tensor.shape) != box_shape(box):
            raise ValueError(f"{key}: chunk of shape {tuple(tensor.shape)} for box {box}")
        if tensor.numel() == 0:
            return
        name = f"{key}@{len(self.tensors)}"
        self.tensors[name] = tensor.detach()
        self.index[name] = {"key": key, "shape": list(global_shape),
                            "offsets": [lo for lo, _ in box]}

    def write(self, path: Path) -> dict[str, int | str]:
        """Stream the chunks into `path` in the safetensors layout; return the file's size and
        SHA-256 (hashed while writing, so the file is not read back)."""
        header: dict = {"__metadata__": {CHUNKS_METADATA: json.dumps(self.index)}}
        offset = 0
        for name, tensor in self.tensors.items():
            size = tensor.numel() * tensor.element_size()
            header[name] = {"dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
        digest, size = hashlib.sha256(), 0
        with open(path, "wb") as handle:
            prefix = struct.pack("<Q", len(encoded)) + encoded
            pieces = itertools.chain([prefix], (  # one tensor's bytes at a time
                memoryview(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
                for t in self.tensors.values()))
            for piece in pieces:
                handle.write(piece)
                digest.update(piece)
                size += len(piece)
        return {"bytes": size, "sha256": digest.hexdigest()}


@dataclass
class Chunk:
    box: Box
    path: Path | None = None  # a safetensors file and the chunk's name in it ...
    name: str = ""
    tensor: torch.Tensor | None = None  # ... or a tensor in memory (legacy optimizer.pt)


class TensorStore:
    """Read boxes of logical tensors from their chunks (shard files, legacy files)."""

    def __init__(self, label: str):
        self.label = label
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.chunks: dict[str, list[Chunk]] = {}
        self._handles: dict[Path, object] = {}
        self.on_first_read = None  # called with a file's path before its data is first read
        self._read_files: set[Path] = set()

    def add_chunk(self, key: str, shape: tuple[int, ...], chunk: Chunk) -> None:
        if self.shapes.setdefault(key, shape) != shape:
            raise CheckpointError(f"{self.label}: {key} has shapes {self.shapes[key]} and {shape}")
        self.chunks.setdefault(key, []).append(chunk)

    def add_safetensors(self, path: Path) -> None:
        """Index a shard file (its chunk metadata) or, without metadata, a plain safetensors
        file whose tensors are whole."""
        handle = self._open(path)
        chunks = json.loads((handle.metadata() or {}).get(CHUNKS_METADATA, "null"))
        if chunks is None:
            names = handle.keys()
            for name in names:
                shape = tuple(handle.get_slice(name).get_shape())
                self.add_chunk(name, shape, Chunk(full_box(shape), path, name))
            return
        for name, info in chunks.items():
            shape = tuple(handle.get_slice(name).get_shape())
            offsets = info["offsets"]
            box = tuple((o, o + s) for o, s in zip(offsets, shape, strict=True))
            self.add_chunk(info["key"], tuple(info["shape"]), Chunk(box, path, name))

    def _open(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"cannot read {path}: {exc}") from exc
        return self._handles[path]

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def read(self, key: str, box: Box | None = None) -> torch.Tensor:
        """The `box` (default: all) of tensor `key`, assembled from the chunks it overlaps."""
        if key not in self.shapes:
            raise CheckpointError(f"{self.label} has no tensor {key!r}")
        box = full_box(self.shapes[key]) if box is None else box
        out, covered = None, 0
        for chunk in self.chunks[key]:
            overlap = intersect(box, chunk.box)
            if overlap is None:
                continue
            piece = self._piece(chunk, box_slices(overlap, chunk.box))
            if out is None:
                out = torch.zeros(box_shape(box), dtype=piece.dtype)
            out[box_slices(overlap, box)] = piece
            covered += piece.numel()
        if covered != math.prod(box_shape(box)):
            raise CheckpointError(f"{self.label}: the chunks of {key} cover {covered} of the "
                                  f"{math.prod(box_shape(box))} elements asked for")
        return out if out is not None else torch.zeros(box_shape(box))

    def _piece(self, chunk: Chunk, slices: tuple[slice, ...]) -> torch.Tensor:
        if chunk.tensor is not None:
            return chunk.tensor[slices]
        if chunk.path not in self._read_files:
            if self.on_first_read is not None:
                self.on_first_read(chunk.path)
            self._read_files.add(chunk.path)
        try:
            return self._open(chunk.path).get_slice(chunk.name)[slices]
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {chunk.name} from {chunk.path}: {exc}") from exc


def index_shards(directory: Path) -> TensorStore:
    """The tensors of every shard file in `directory`."""
    store = TensorStore(str(directory))
    files = sorted(directory.glob(SHARD_GLOB))
    if not files:
        raise CheckpointError(f"{directory} has no {SHARD_GLOB} files")
    for path in files:
        store.add_safetensors(path)
    return store
