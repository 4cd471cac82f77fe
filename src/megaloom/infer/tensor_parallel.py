"""Tensor-parallel inference: one model split over the ranks of a torchrun job, driven by rank 0.

Scheme: identical engines in lockstep. Every rank holds a `TensorParallelEngine` over its shard
of the model (`load_tensor_parallel`: tp = world size, no pipeline or data parallelism). Only
rank 0 takes requests (CLI prompts, HTTP); it records each accepted request (with the id it
was given, and a random seed when it samples without one) and each cancellation, and at every
`step()` broadcasts them to the followers, which replay them into their engines and step too
(`follow`). Each forward all-gathers the vocab-parallel logits (`FullLogitsGPT`), so every
rank sees the same full logits, samples the same tokens from the same per-request generators,
and therefore schedules the same batches: the collectives of every forward line up. Only rank
0's outputs are used. Control messages travel on their own gloo group with a long timeout, so
an idle server does not time its followers out; `shutdown()` (or `drive`) sends them home.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from megaloom.config import Config
from megaloom.errors import MegaloomError
from megaloom.infer.engine import Engine, Event, Request, RequestHandle
from megaloom.model.gpt import GPT
from megaloom.parallel.topology import Axis, Topology, init_distributed
from megaloom.utils.launch import Launch

log = logging.getLogger(__name__)

T = TypeVar("T")
CONTROL_TIMEOUT = timedelta(days=30)  # a server may sit idle between requests


class FullLogitsGPT(nn.Module):
    """A tensor-parallel `GPT` whose forward returns the full padded-vocabulary logits on
    every rank. `local_kv_heads` tells the engine how many kv heads this rank caches."""

    def __init__(self, model: GPT, axis: Axis):
        super().__init__()
        self.model = model
        self.axis = axis
        self.config = model.config
        self.local_kv_heads = model.config.num_kv_heads // axis.size

    def forward(self, *args, **kwargs) -> torch.Tensor:
        local = self.model(*args, **kwargs)
        return self.axis.all_gather(local, -1)[..., : self.config.padded_vocab_size]


def load_tensor_parallel(spec: str | Path, device: torch.device | None = None,
                         ) -> tuple[FullLogitsGPT, Config, Path | None, Topology]:
    """Join the torchrun job and build this rank's tensor-parallel shard of the checkpoint
    `spec` (anything `load_model` accepts) on this process's own accelerator of `device`'s
    type (default: the local accelerator, else the CPU), reading only this rank's slices of a
    megaloom checkpoint.

    Returns (model, config, tokenizer path, topology)."""
    from megaloom.loading import load_shard

    if device is not None:
        device = Launch.from_environment().device(device)
    init_distributed(device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    topo = Topology.build(tp=world, pp=1, device=device)
    try:
        model, config, tokenizer = load_shard(spec, topo, dropout_seed=0)
    except ValueError as exc:
        raise MegaloomError(f"cannot split {spec} over {world} tensor-parallel ranks: "
                            f"{exc}") from None
    if getattr(model, "encoder_decoder", False) and world > 1:
        raise MegaloomError(f"{spec} is an encoder-decoder (model.arch={config.model.arch}): "
                            "tensor-parallel inference serves decoder-only models; run it "
                            "on one process")
    return FullLogitsGPT(model.eval(), topo.tp_axis), config, tokenizer, topo


def check_tensor_parallel(topo: Topology) -> None:
    """Reject layouts other than pure tensor parallelism (one model over all ranks)."""
    if topo.pp > 1 or topo.dp > 1:
        raise MegaloomError(f"tensor-parallel inference needs tp = world size; got tp={topo.tp}"
                            f", pp={topo.pp}, dp={topo.dp} (pipeline and data parallelism "
                            "are not supported for inference)")


class TensorParallelEngine(Engine):
    """An `Engine` over a `FullLogitsGPT` that keeps the engines of all ranks in lockstep.

    On rank 0 use it as any engine (`add_request`, `cancel`, `step`, `generate`) and call
    `shutdown()` at the end; on the other ranks call `follow()`. Every rank must construct it.
    """

    def __init__(self, model: FullLogitsGPT, topo: Topology, tokenizer: object | None = None,
                 max_batch_size: int = 8):
        check_tensor_parallel(topo)
        super().__init__(model, tokenizer, max_batch_size)
        self.is_driver = topo.rank == 0
        self._group = (dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
                       if topo.world_size > 1 else None)
        self._pending: list[tuple] = []
        self._seeds = random.SystemRandom()

    # ------------------------------------------------------------------ rank 0

    def add_request(self, request: Request) -> RequestHandle:
        params = request.params
        if self.is_driver and params.seed is None and not params.greedy:
            request = replace(request, params=replace(params, seed=self._seeds.randrange(2**31)))
        handle = super().add_request(request)
        if self.is_driver:
            output = handle.output
            self._pending.append(("add", output.prompt_token_ids, output.params,
                                  output.request_id))
        return handle

    def cancel(self, request_id: str) -> None:
        super().cancel(request_id)
        if self.is_driver:
            self._pending.append(("cancel", request_id))

    def step(self) -> list[Event]:
        if self.is_driver:
            self._broadcast(self._pending)
            self._pending = []
        return super().step()

    def shutdown(self) -> None:
        """Tell the followers to return from `follow()` (rank 0). Followers already gone
        (torchrun stopping the job on a signal) are not an error."""
        try:
            self._broadcast(None)
        except RuntimeError as exc:
            log.warning("could not reach the follower ranks at shutdown: %s", exc)

    # ------------------------------------------------------------------ followers

    def follow(self) -> None:
        """Replay rank 0's requests and steps until it calls `shutdown()` (ranks > 0)."""
        while (ops := self._broadcast(None)) is not None:
            for op in ops:
                if op[0] == "add":
                    _, prompt_ids, params, request_id = op
                    self.add_request(Request(prompt_ids, params, request_id=request_id))
                else:
                    self.cancel(op[1])
            self.step()

    def close(self) -> None:
        """Release the control group (every rank, after `shutdown` / `follow`)."""
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

    def _broadcast(self, message: object) -> object:
        """Rank 0's `message`, on every rank."""
        if self._group is None:
            return message
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]


def drive(engine: Engine, lead: Callable[[], T]) -> T | None:
    """Run `lead()` (which uses `engine`) on rank 0 while the other ranks follow it; a plain
    engine just runs `lead()`. Returns `lead()`'s result on rank 0, None elsewhere."""
    if not isinstance(engine, TensorParallelEngine):
        return lead()
    try:
        if not engine.is_driver:
            engine.follow()
            return None
        try:
            return lead()
        finally:
            engine.shutdown()
    finally:
        engine.close()
