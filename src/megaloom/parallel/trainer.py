"""`megaloom train` under torchrun: the single-process `Trainer` with its parallel hooks.

`build_parallel_trainer` joins the torchrun job, builds the `Topology` from `parallel.tp` and
`parallel.pp` (dp takes the rest of the world size), lets rank 0 prepare the data first, builds
the ordinary `Trainer` (which resumes from the newest checkpoint, in the layout-free
single-process format), then converts it: `parallelize` slices the full weights, and the plain
AdamW state is sliced into a `ParallelOptimizer`. Saving does the reverse: full weights and
optimizer state are gathered to rank 0, which writes the same checkpoint a single process would.

Each dp rank takes a contiguous 1/dp of every global batch; validation micro-batches are dealt
round-robin over dp; losses are sums over all ranks divided by global token counts. Only rank 0
writes metrics, plots, logs and checkpoints.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megaloom.config import Config, ConfigError
from megaloom.model.gpt import GPT
from megaloom.parallel.data_parallel import ParallelOptimizer
from megaloom.parallel.loss import parallel_lm_loss
from megaloom.parallel.parallelize import gather_full_state_dict, load_full_state_dict, parallelize
from megaloom.parallel.pipeline import forward_backward, forward_only
from megaloom.parallel.pipeline_interleaved import (
    check_backend,
    interleaved_forward_backward,
    interleaved_forward_only,
)
from megaloom.parallel.random import seed_everything
from megaloom.parallel.topology import Topology, init_distributed
from megaloom.train import checkpoint as ckpt
from megaloom.train.precision import autocast_context
from megaloom.train.trainer import MicroBatch, Trainer
from megaloom.utils.device import resolve_device

log = logging.getLogger(__name__)


class _SavedOptimizer:
    """Stands in for an optimizer whose (gathered) state dict is already known."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


class ParallelTrainer(Trainer):
    """A `Trainer` whose model and optimizer are this rank's part of a (tp, pp, dp) layout."""

    def __init__(self, plain: Trainer, topo: Topology):
        self.__dict__.update(plain.__dict__)
        config, cfg = self.config, self.cfg
        self.topo = topo
        self.sequence_parallel = config.parallel.sequence_parallel and topo.tp > 1
        if cfg.global_batch_size % (cfg.micro_batch_size * topo.dp):
            raise ConfigError(f"train.global_batch_size={cfg.global_batch_size} must be a "
                              f"multiple of train.micro_batch_size x dp = "
                              f"{cfg.micro_batch_size} x {topo.dp}")
        self.accumulation = cfg.global_batch_size // (cfg.micro_batch_size * topo.dp)
        self.vpp = config.parallel.vpp
        if self.vpp > 1 and self.accumulation % topo.pp:
            raise ConfigError(f"parallel.vpp={self.vpp}: the micro-batches per step and dp "
                              f"rank ({self.accumulation}) must be a multiple of parallel.pp="
                              f"{topo.pp}")
        if self.vpp > 1:
            try:
                check_backend(topo)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        tracker = seed_everything(cfg.seed, topo)
        plain_optimizer = plain.optimizer
        self.model = parallelize(plain.model, topo, self.sequence_parallel, tracker, self.vpp)
        self.optimizer = ParallelOptimizer(self.model, topo, cfg,
                                           config.parallel.distributed_optimizer)
        self.params = self.optimizer.params
        if plain_optimizer.state:
            self.optimizer.load_state_dict(plain_optimizer.state_dict(), config.model)

    # ------------------------------------------------------------------ batches

    def micro_batches(self, step: int) -> list[MicroBatch]:
        cfg, mbs = self.cfg, self.cfg.micro_batch_size
        start = step * cfg.global_batch_size + self.topo.dp_axis.rank * self.accumulation * mbs
        return [MicroBatch.from_samples([self.train_data[start + j * mbs + k]
                                         for k in range(mbs)], self.device)
                for j in range(self.accumulation)]

    def _as_dicts(self, batches: list[MicroBatch]) -> list[dict[str, torch.Tensor]]:
        return [{"tokens": mb.inputs, "targets": mb.targets, "loss_mask": mb.loss_mask}
                for mb in batches]

    def _loss_sum(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return parallel_lm_loss(logits, batch["targets"], self.topo.tp_axis,
                                self.config.model.vocab_size, batch["loss_mask"])

    def _global_sum(self, *values: float | torch.Tensor) -> list[float]:
        """Sum over dp replicas and pipeline stages (values live on the last stage)."""
        totals = torch.tensor([float(v) for v in values], dtype=torch.float64,
                              device=self.device)
        self.topo.pp_axis.all_reduce(self.topo.dp_axis.all_reduce(totals))
        return totals.tolist()

    # ------------------------------------------------------------------ hooks

    def loss_and_gradients(self, batches: list[MicroBatch], loss_scale: float) -> float:
        local = float(sum(mb.loss_mask.sum().item() for mb in batches))
        (count,) = self._global_sum(local if self.topo.is_last_stage else 0.0)
        schedule = (partial(interleaved_forward_backward, vpp=self.vpp) if self.vpp > 1
                    else forward_backward)
        self.optimizer.start_backward(len(batches))
        total = schedule(
            self.model, self._as_dicts(batches), self.topo,
            lambda logits, batch: self._loss_sum(logits, batch) / count,
            sequence_parallel=self.sequence_parallel, loss_scale=loss_scale,
            forward_context=lambda: autocast_context(self.cfg.precision, self.device))
        self.optimizer.finish_backward()
        return self._global_sum(total)[0]

    def clip_gradients(self) -> float:
        self.optimizer.reduce_gradients()
        return self.optimizer.clip_grad_norm(self.cfg.grad_clip)

    def stop_requested(self) -> bool:
        flag = torch.tensor([float(self._stop_signal is not None)], device=self.device)
        return bool(self.topo.world_axis.all_reduce(flag, op=dist.ReduceOp.MAX).item())

    def train_step(self) -> dict:
        record = super().train_step()
        record["tokens_per_s"] *= self.topo.dp  # the base class counts this rank's tokens
        return record

    @torch.no_grad()
    def evaluate(self, data=None) -> float | None:
        data = self.valid_data if data is None else data
        if data is None:
            return None
        self.model.eval()
        mbs, dp = self.cfg.micro_batch_size, self.topo.dp_axis
        count = min(self.cfg.eval_iters, len(data) // mbs)
        batches = [MicroBatch.from_samples([data[i * mbs + k] for k in range(mbs)], self.device)
                   for i in range(dp.rank, count, dp.size)]
        schedule = (partial(interleaved_forward_only, vpp=self.vpp) if self.vpp > 1
                    else forward_only)
        total = schedule(self.model, self._as_dicts(batches), self.topo, self._loss_sum,
                         sequence_parallel=self.sequence_parallel,
                         forward_context=lambda: autocast_context(self.cfg.precision,
                                                                  self.device))
        tokens = sum(mb.loss_mask.sum().item() for mb in batches)
        total, tokens = self._global_sum(total, tokens if self.topo.is_last_stage else 0.0)
        return total / tokens if tokens else None

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        weights = gather_full_state_dict(self.model, self.topo)
        optimizer_state = self.optimizer.state_dict(self.config.model)
        path = [None]
        if self.is_main:
            with torch.device("meta"):
                plain = GPT(self.config.model)
            plain.load_state_dict(weights, assign=True)
            path[0] = ckpt.save_checkpoint(
                self.out_dir, self.step, plain, self.config, self.tokenizer_path,
                _SavedOptimizer(optimizer_state), self.trainer_state(), self.cfg.keep_last)
            log.info("saved checkpoint %s", path[0])
        if self.topo.world_size > 1:
            dist.broadcast_object_list(path, src=0)
        return path[0]

    def resume(self, path: str | Path) -> None:
        """Resume from a checkpoint written under any layout (or by a single process)."""
        plain = Trainer(self.config, GPT(self.config.model), self.train_data, self.valid_data,
                        self.tokenizer_path, torch.device("cpu"))
        plain.resume(path)
        load_full_state_dict(self.model, plain.model.state_dict(), self.topo)
        self.optimizer.refresh_shards()
        self.optimizer.load_state_dict(plain.optimizer.state_dict(), self.config.model)
        self.step, self.skipped_steps = plain.step, plain.skipped_steps
        if self.scaler and plain.scaler:
            self.scaler.load_state_dict(plain.scaler.state_dict())


def build_parallel_trainer(config: Config, resume: bool = True) -> ParallelTrainer:
    """Join the torchrun job and build this rank's trainer (rank 0 prepares data first)."""
    from megaloom.train.run import build_trainer

    device = resolve_device(config.train.device)
    if device.type != "cpu":
        device = torch.device(device.type, int(os.environ.get("LOCAL_RANK", "0")))
    init_distributed(device)
    try:
        topo = Topology.build(config.parallel.tp, config.parallel.pp, device)
    except ValueError as exc:
        raise ConfigError(f"parallel.tp/parallel.pp: {exc} (start more processes with "
                          "`megaloom train --nproc N` or torchrun --nproc-per-node N)") from exc
    if topo.rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    # Data caches are built once: by rank 0, then by the first process of each other node
    # (for node-local file systems), then read by everyone else.
    turn = 0 if topo.rank == 0 else 1 if os.environ.get("LOCAL_RANK", "0") == "0" else 2
    plain = None
    for stage in range(3):
        if stage == turn:
            plain = build_trainer(config, resume=resume)
        if topo.world_size > 1:
            dist.barrier()
    log.info("layout: tp=%d pp=%d dp=%d%s%s", topo.tp, topo.pp, topo.dp,
             " sequence-parallel" if config.parallel.sequence_parallel else "",
             " distributed-optimizer" if config.parallel.distributed_optimizer else "")
    return ParallelTrainer(plain, topo)
