"""The training loop, for one process and every parallel layout alike: batches,
forward/backward, optimizer step, validation, metrics, sharded checkpoints, clean interruption.

A `Trainer` is composed of this rank's model shard (`parallel.build`), a `Topology` (a single
process is the 1 x 1 x 1 layout, no process group needed) and a `ParallelOptimizer`; the
pipeline schedule runs the forward/backward (one stage: forward then backward per
micro-batch). Each dp rank takes a contiguous 1/dp of every global batch; validation
micro-batches are dealt round-robin over dp; losses are sums over all ranks divided by global
token counts. Only rank 0 writes metrics, plots and logs; every rank writes its own checkpoint
shard, and `resume` reads back the boxes this rank owns from a checkpoint of any layout.

Data order is a pure function of the step (global batch `s` holds samples `s*G .. (s+1)*G-1`),
the LR a pure function of the step, and RNG/optimizer/loss-scaler state is checkpointed, so a
resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megaloom.checkpoint.files import STATE_FILE
from megaloom.checkpoint.reader import find_latest, open_checkpoint
from megaloom.checkpoint.shards import ShardWriter
from megaloom.compress.gradual import GradualPruner
from megaloom.config import Config, ConfigError
from megaloom.errors import CheckpointError, MegaloomError, PeerFailure
from megaloom.model.gpt import GPT
from megaloom.parallel.build import (
    InitSource,
    TensorSource,
    build_shard,
    load_weights,
    write_weights,
)
from megaloom.parallel.data_parallel import ParallelOptimizer
from megaloom.parallel.parallelize import check_layout
from megaloom.parallel.pipeline import forward_backward, forward_only
from megaloom.parallel.pipeline_interleaved import (
    check_backend,
    interleaved_forward_backward,
    interleaved_forward_only,
)
from megaloom.parallel.random import seed_everything
from megaloom.parallel.topology import (
    Topology,
    describe_collective_failure,
    is_collective_failure,
)
from megaloom.tasks import LanguageModelTask, Task
from megaloom.train.checkpoint import restore_rng_state, save_checkpoint, step_dir_name
from megaloom.train.metrics import MetricsLog, read_metrics
from megaloom.train.mfu import FlopsMeter, progress_rate
from megaloom.train.precision import DynamicLossScaler, autocast_context
from megaloom.train.schedule import learning_rate
from megaloom.utils.device import native_bf16, resolve_device
from megaloom.utils.io import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    checkpoint: Path | None
    interrupted: bool


class Trainer:
    """Train this rank's `model` shard on `train_data` as `config.train` says, writing into
    `config.train.out_dir`. Datasets are indexable sequences of whatever `task` batches
    (default: language modelling on int64 arrays of `seq_len + 1` tokens). Build one with
    `create` (or `megaloom.train.run.build_trainer`)."""

    def __init__(
        self,
        config: Config,
        topo: Topology,
        model: GPT,
        optimizer: ParallelOptimizer,
        train_data: Sequence,
        valid_data: Sequence | None,
        tokenizer_path: str | Path | None,
        task: Task | None = None,
    ):
        self.config = config
        self.task = task or LanguageModelTask(config.model.vocab_size)
        self.cfg = config.train
        self.topo = topo
        self.device = topo.device
        self.model = model
        self.model.activation_checkpointing = self.cfg.activation_checkpointing
        self.optimizer = optimizer
        self.params = optimizer.params
        self.train_data = train_data
        self.valid_data = valid_data
        self.tokenizer_path = tokenizer_path
        self.out_dir = Path(self.cfg.out_dir)
        self.sequence_parallel = config.parallel.sequence_parallel and topo.tp > 1
        self.vpp = config.parallel.vpp
        self.scaler = (
            DynamicLossScaler(self.cfg.initial_loss_scale, self.cfg.loss_scale_window)
            if self.cfg.precision == "fp16"
            else None
        )
        self.accumulation = self.cfg.global_batch_size // (self.cfg.micro_batch_size * topo.dp)
        self.step = 0
        self.skipped_steps = 0
        self._stop_signal: int | None = None
        self.flops = FlopsMeter.for_run(config, self.device, topo.world_size)
        self.pruner = (GradualPruner(model, topo, self.cfg.pruning, self.cfg.max_steps)
                       if self.cfg.pruning.enabled else None)

    @classmethod
    def create(
        cls,
        config: Config,
        train_data: Sequence,
        valid_data: Sequence | None,
        tokenizer_path: str | Path | None = None,
        topo: Topology | None = None,
        source: TensorSource | None = None,
        task: Task | None = None,
        adapt=None,
    ) -> Trainer:
        """This rank's trainer for `config.parallel` on `topo` (default: the process group
        or a single process): the layout is checked, the shard built from `source` (default:
        the fresh initialisation for `train.seed`) and its optimizer made. `adapt(model,
        topo, tracker)`, when given, changes the shard before the optimizer sees it (LoRA)."""
        topo = topo or Topology.build(config.parallel.tp, config.parallel.pp,
                                      resolve_device(config.train.device))
        try:
            check_layout(config.model, topo, config.parallel.sequence_parallel,
                         config.parallel.vpp, config.train.activation_checkpointing,
                         config.train.micro_batch_size, config.train.global_batch_size)
            if config.parallel.vpp > 1:
                check_backend(topo)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        sp = config.parallel.sequence_parallel and topo.tp > 1
        tracker = seed_everything(config.train.seed, topo)
        model = build_shard(config.model, topo, source or InitSource(config.model,
                                                                     config.train.seed),
                            sp, tracker, config.parallel.vpp)
        if adapt is not None:
            adapt(model, topo, tracker)
        optimizer = ParallelOptimizer(model, topo, config.train,
                                      config.parallel.distributed_optimizer)
        return cls(config, topo, model, optimizer, train_data, valid_data, tokenizer_path, task)

    # ------------------------------------------------------------------ state

    def trainer_state(self) -> dict:
        return {
            "consumed_samples": self.step * self.cfg.global_batch_size,
            "skipped_steps": self.skipped_steps,
            "loss_scaler": self.scaler.state_dict() if self.scaler else None,
            "adam_steps": self.optimizer.adam_steps(),
            "layout": {"tp": self.topo.tp, "pp": self.topo.pp, "dp": self.topo.dp,
                       "vpp": self.vpp,
                       "distributed_optimizer": self.optimizer.distributed},
            "pruning": self.pruner.state() if self.pruner else None,
        }

    def save(self) -> Path:
        """Every rank writes its own shard of weights and optimizer state (collective)."""

        def add_chunks(writer: ShardWriter) -> None:
            write_weights(writer, self.model, self.topo)
            self.optimizer.write_state(writer)
            if self.pruner:
                self.pruner.write(writer)

        path = save_checkpoint(self.out_dir, self.step, add_chunks, self.config,
                                    self.tokenizer_path, self.trainer_state(),
                                    self.cfg.keep_last, self.topo.patient_group,
                                    self.topo.world_axis.timeout)
        log.info("saved checkpoint %s", path)
        return path

    def resume(self, path: str | Path) -> None:
        """Restore the full training state from a checkpoint written under any layout (or an
        earlier single-file checkpoint), reading only this rank's boxes; drop metrics logged
        after that checkpoint."""
        checkpoint = open_checkpoint(path)
        saved = checkpoint.config.model
        if saved != self.config.model:
            current = self.config.model
            diffs = [k for k in saved.__dict__ if getattr(saved, k) != getattr(current, k)]
            raise CheckpointError(
                f"{checkpoint.directory} was trained with a different model config "
                f"(differs in: {', '.join('model.' + k for k in diffs)})"
            )
        state = checkpoint.state
        if "step" not in state:
            raise CheckpointError(
                f"{checkpoint.directory} holds weights only (no {STATE_FILE}), so there is no "
                f"training state to resume; start a new run from it with "
                f"model.init_from={checkpoint.directory}")
        load_weights(self.model, self.topo, checkpoint)
        self.optimizer.read_state(checkpoint.store, state.get("adam_steps"))
        rng = checkpoint.rng_state()
        if rng is not None:
            restore_rng_state(rng)
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.scaler and state.get("loss_scaler"):
            self.scaler.load_state_dict(state["loss_scaler"])
        if self.pruner:
            self.pruner.read(checkpoint, state.get("pruning"))
        if self.is_main:
            self._truncate_metrics(self.step)
        log.info("resumed from %s at step %d", checkpoint.directory, self.step)

    def _truncate_metrics(self, step: int) -> None:
        path = self.out_dir / "metrics.jsonl"
        if path.is_file():
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------ batches

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This dp rank's contiguous share of global batch `step`, batched by the task."""
        cfg, mbs = self.cfg, self.cfg.micro_batch_size
        start = step * cfg.global_batch_size + self.topo.dp_axis.rank * self.accumulation * mbs
        return [self.task.batch([self.train_data[start + j * mbs + k] for k in range(mbs)],
                                self.device)
                for j in range(self.accumulation)]

    def _loss_sum(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.task.loss_sum(output, batch, self.topo.tp_axis)

    def _global_sum(self, *values: float | torch.Tensor) -> list[float]:
        """Sum over dp replicas and pipeline stages (values live on the last stage)."""
        totals = torch.tensor([float(v) for v in values], dtype=torch.float64,
                              device=self.device)
        self.topo.pp_axis.all_reduce(self.topo.dp_axis.all_reduce(totals))
        return totals.tolist()

    def _forward_context(self):
        return autocast_context(self.cfg.precision, self.device)

    # ------------------------------------------------------------------ one step

    @property
    def is_main(self) -> bool:
        """Whether this process writes metrics, plots and progress (rank 0 of a torchrun job)."""
        return self.topo.rank == 0

    def loss_and_gradients(self, batches: list[dict[str, torch.Tensor]],
                           loss_scale: float) -> float:
        """Forward and backward over one global batch; return the mean loss per counted unit
        (trained token, or row for classification)."""
        local = sum(self.task.count(batch) for batch in batches)
        (count,) = self._global_sum(local if self.topo.is_last_stage else 0.0)
        if count <= 0:
            raise MegaloomError(f"step {self.step + 1}: the global batch has no trained token "
                                "(every loss-mask entry is 0); check the task's data")
        schedule = (partial(interleaved_forward_backward, vpp=self.vpp) if self.vpp > 1
                    else forward_backward)
        self.optimizer.start_backward(len(batches))
        total = schedule(
            self.model, batches, self.topo,
            lambda logits, batch: self._loss_sum(logits, batch) / count,
            sequence_parallel=self.sequence_parallel, loss_scale=loss_scale,
            forward_context=self._forward_context)
        self.optimizer.finish_backward()
        return self._global_sum(total)[0]

    def clip_gradients(self) -> float:
        """Reduce gradients over the layout, clip to `train.grad_clip`; return the pre-clip
        global gradient norm (the same on every rank)."""
        self.optimizer.reduce_gradients()
        return self.optimizer.clip_grad_norm(self.cfg.grad_clip)

    def stop_requested(self) -> bool:
        """Whether any rank received SIGINT/SIGTERM (all ranks stop at the same step)."""
        flag = torch.tensor([float(self._stop_signal is not None)], device=self.device)
        return bool(self.topo.world_axis.all_reduce(flag, op=dist.ReduceOp.MAX).item())

    def train_step(self) -> dict:
        started = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        batches = self.micro_batches(self.step)
        scale = self.scaler.scale if self.scaler else 1.0
        loss = self.loss_and_gradients(batches, scale)
        if self.scaler:
            grads = [p.grad for p in self.params if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / scale)
        grad_norm = self.clip_gradients()
        lr = learning_rate(self.step, self.cfg)
        skipped = not math.isfinite(grad_norm)
        if skipped and not self.scaler:  # no loss scale to back off: the run has diverged
            raise MegaloomError(
                f"step {self.step + 1}: training diverged (loss {loss}, gradient norm "
                f"{grad_norm}, lr {lr:g}); no update was made and the last checkpoint is "
                "intact: lower train.lr, or keep train.grad_clip on")
        if skipped:
            self.skipped_steps += 1
            log.warning("step %d: non-finite gradient norm; update skipped", self.step + 1)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        if self.scaler:
            self.scaler.update(skipped)
        self.step += 1
        if self.pruner:
            self.pruner.after_step(self.step)
        elapsed = time.perf_counter() - started
        tokens = sum(batch["tokens"].numel() for batch in batches) * self.topo.dp
        record = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / elapsed,
            **self.flops.figures(tokens / elapsed),
            "step_time_s": elapsed,
            "skipped": skipped,
        }
        if self.scaler:
            record["loss_scale"] = self.scaler.scale
        if self.pruner:
            record.update(self.pruner.figures)
        return record

    @torch.no_grad()
    def evaluate(self, data: Sequence | None = None, limit: int | None = -1) -> float | None:
        """Mean loss per counted unit over the first `limit` micro-batches (default
        `train.eval_iters`, None: all whole ones) of `data` (default: the valid split)."""
        data = self.valid_data if data is None else data
        if data is None:
            return None
        limit = self.cfg.eval_iters if limit == -1 else limit
        batches = self._eval_batches(data, len(data) if limit is None else limit)
        total = self._forward_only(batches, self._loss_sum)
        units = sum(self.task.count(batch) for batch in batches)
        total, units = self._global_sum(total, units if self.topo.is_last_stage else 0.0)
        return total / units if units else None

    @torch.no_grad()
    def predict(self, data: Sequence, outputs: Callable) -> list:
        """`outputs(stage_output, batch)` -> one item per row, for every row of `data`, in
        order, on every rank (the last micro-batch is filled up with copies of the last row,
        whose items are dropped). Collective."""
        mbs = self.cfg.micro_batch_size
        count = -(-len(data) // mbs)
        padded = list(data)
        padded += [padded[-1]] * (count * mbs - len(padded))
        batches = self._eval_batches(padded, count)
        mine: list = []

        def collect(output, batch):
            mine.append(outputs(output, batch))
            return torch.zeros((), device=self.device)

        self._forward_only(batches, collect)
        rows = []
        gathered = [mine]
        if self.topo.world_size > 1:
            gathered = [None] * self.topo.world_size
            dist.all_gather_object(gathered, mine if self.topo.is_last_stage
                                   and self.topo.tp_axis.rank == 0 else None)
        per_dp = [g for g in gathered if g is not None]  # last-stage tp-0 ranks, dp order
        for index in range(count):  # micro-batch i lives on dp rank i % dp, as its (i // dp)th
            rows.extend(per_dp[index % len(per_dp)][index // len(per_dp)])
        return rows[:len(data)]

    def _eval_batches(self, data: Sequence, limit: int) -> list[dict[str, torch.Tensor]]:
        """This dp rank's round-robin share of the first `limit` micro-batches of `data`."""
        self.model.eval()
        mbs, dp = self.cfg.micro_batch_size, self.topo.dp_axis
        count = min(limit, len(data) // mbs)
        return [self.task.batch([data[i * mbs + k] for k in range(mbs)], self.device)
                for i in range(dp.rank, count, dp.size)]

    def _forward_only(self, batches: list[dict[str, torch.Tensor]], loss_fn) -> torch.Tensor:
        schedule = (partial(interleaved_forward_only, vpp=self.vpp) if self.vpp > 1
                    else forward_only)
        return schedule(self.model, batches, self.topo, loss_fn,
                        sequence_parallel=self.sequence_parallel,
                        forward_context=self._forward_context)

    # ------------------------------------------------------------------ loop

    def run(self) -> TrainResult:
        """Train until `max_steps` (or `exit_at_step`, or a signal) and save at the end. The
        loss plot is the command's job (`metrics.plot_run`), once this trainer's memory is
        released: matplotlib loaded next to the model would add ~25 MB to the run's peak."""
        cfg = self.cfg
        end = cfg.max_steps if cfg.exit_at_step is None else min(cfg.exit_at_step, cfg.max_steps)
        metrics = MetricsLog(self.out_dir, cfg.tensorboard,
                             start_step=self.step if self.is_main else None)
        previous = self._install_signal_handlers()
        if self.is_main:
            log.info("%s", self.flops.describe())
            if (self.device.type == "cpu" and cfg.precision != "fp32" and not native_bf16()):
                log.warning("train.precision=%s on a CPU without native bf16 kernels (no "
                            "AVX-512 BF16 / AMX): autocast is far slower here than fp32 (bf16, "
                            "tiny recipe: ~28x); use train.precision=fp32", cfg.precision)
        if self.pruner:
            self.pruner.begin(self.step)
        last_loss = val_loss = None
        last_saved = find_latest(self.out_dir) if self.out_dir.exists() else None
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="train", unit="step",
                   dynamic_ncols=True, mininterval=0.5, disable=not self.is_main)
        try:
            while self.step < end and not self.stop_requested():
                record = self.train_step()
                last_loss = record["loss"]
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                    val_loss = self.evaluate()
                    if val_loss is not None:
                        record["val_loss"] = val_loss
                        record["val_ppl"] = math.exp(min(val_loss, 50.0))
                if self.is_main and (self.step % cfg.log_interval == 0 or "val_loss" in record):
                    metrics.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}", **progress_rate(record),
                                **({"sparsity": f"{record['sparsity']:.3f}"} if self.pruner
                                   else {}))
                if self.step % cfg.save_interval == 0:
                    last_saved = self.save()
            if last_saved is None or last_saved.name != step_dir_name(self.step):
                last_saved = self.save()
        except RuntimeError as exc:
            if self.topo.world_size > 1 and is_collective_failure(exc):
                raise PeerFailure(describe_collective_failure(
                    exc, self.topo, self.config.parallel.timeout_s)) from exc
            raise
        finally:
            bar.close()
            metrics.close()
            self._restore_signal_handlers(previous)
        interrupted = self._stop_signal is not None
        if interrupted:
            log.warning("stopped by %s at step %d; checkpoint saved to %s",
                        signal.Signals(self._stop_signal).name, self.step, last_saved)
        return TrainResult(self.step, last_loss, val_loss, last_saved, interrupted)

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> dict:
        def request_stop(signum, _frame):
            if self._stop_signal is not None:  # second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            log.warning("%s received: finishing the step, then saving a checkpoint",
                        signal.Signals(signum).name)

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                previous[sig] = signal.signal(sig, request_stop)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
