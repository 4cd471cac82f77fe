"""The training loop on one process: batches, forward/backward, optimizer step, validation,
metrics, checkpoints and clean interruption.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from megaloom.config import Config
from megaloom.errors import CheckpointError
from megaloom.model.gpt import GPT, lm_loss
from megaloom.train import checkpoint as ckpt
from megaloom.train.metrics import MetricsLog, plot_loss, read_metrics
from megaloom.train.optim import build_optimizer
from megaloom.train.precision import DynamicLossScaler, autocast_context, clip_grad_norm
from megaloom.train.schedule import learning_rate
from megaloom.utils.io import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    """Inputs, next-token targets and a mask of the positions that count in the loss."""

    inputs: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor

    @classmethod
    def from_samples(cls, samples: Sequence[np.ndarray], device: torch.device) -> MicroBatch:
        tokens = torch.from_numpy(np.stack(samples).astype(np.int64)).to(device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        return cls(inputs, targets, torch.ones_like(targets, dtype=torch.float32))


@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    checkpoint: Path | None
    interrupted: bool


def forward_backward(
    model: GPT,
    micro_batches: Sequence[MicroBatch],
    loss_denominator: float,
    precision: str,
    loss_scale: float = 1.0,
) -> float:
    """Accumulate gradients over micro-batches; return the mean loss per counted token.

    Each micro-batch's summed token loss is divided by the token count of the whole global
    batch (`loss_denominator`), so accumulation gives exactly the full-batch gradient.
    """
    device = micro_batches[0].inputs.device
    vocab = model.config.vocab_size
    total = torch.zeros((), device=device)
    for mb in micro_batches:
        with autocast_context(precision, device):
            logits = model(mb.inputs)
        loss_sum = lm_loss(logits, mb.targets, vocab, mb.loss_mask, reduction="sum")
        (loss_sum * (loss_scale / loss_denominator)).backward()
        total += loss_sum.detach()
    return total.item() / loss_denominator


class Trainer:
    """Train `model` on `train_data` as `config.train` says, writing into `config.train.out_dir`.

    Datasets are indexable sequences of int64 arrays of `seq_len + 1` tokens.
    """

    def __init__(
        self,
        config: Config,
        model: GPT,
        train_data: Sequence[np.ndarray],
        valid_data: Sequence[np.ndarray] | None,
        tokenizer_path: str | Path | None,
        device: torch.device,
    ):
        self.config = config
        self.cfg = config.train
        self.model = model.to(device)
        self.model.activation_checkpointing = self.cfg.activation_checkpointing
        self.train_data = train_data
        self.valid_data = valid_data
        self.tokenizer_path = tokenizer_path
        self.device = device
        self.out_dir = Path(self.cfg.out_dir)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.scaler = (
            DynamicLossScaler(self.cfg.initial_loss_scale, self.cfg.loss_scale_window)
            if self.cfg.precision == "fp16"
            else None
        )
        self.accumulation = self.cfg.global_batch_size // self.cfg.micro_batch_size
        self.step = 0
        self.skipped_steps = 0
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------ state

    def trainer_state(self) -> dict:
        return {
            "consumed_samples": self.step * self.cfg.global_batch_size,
            "skipped_steps": self.skipped_steps,
            "loss_scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def save(self) -> Path:
        path = ckpt.save_checkpoint(
            self.out_dir, self.step, self.model, self.config, self.tokenizer_path,
            self.optimizer, self.trainer_state(), self.cfg.keep_last,
        )
        log.info("saved checkpoint %s", path)
        return path

    def resume(self, path: str | Path) -> None:
        """Restore the full training state and drop metrics logged after that checkpoint."""
        directory = ckpt.resolve_checkpoint(path)
        saved = ckpt.load_config_file(directory).model
        if saved != self.config.model:
            current = self.config.model
            diffs = [k for k in saved.__dict__ if getattr(saved, k) != getattr(current, k)]
            raise CheckpointError(
                f"{directory} was trained with a different model config "
                f"(differs in: {', '.join('model.' + k for k in diffs)})"
            )
        state = ckpt.load_checkpoint(directory, self.model, self.optimizer)
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.scaler and state.get("loss_scaler"):
            self.scaler.load_state_dict(state["loss_scaler"])
        if self.is_main:
            self._truncate_metrics(self.step)
        log.info("resumed from %s at step %d", directory, self.step)

    def _truncate_metrics(self, step: int) -> None:
        path = self.out_dir / "metrics.jsonl"
        if path.is_file():
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    # ------------------------------------------------------------------ batches

    def micro_batches(self, step: int) -> list[MicroBatch]:
        start = step * self.cfg.global_batch_size
        mbs = self.cfg.micro_batch_size
        return [
            MicroBatch.from_samples(
                [self.train_data[start + j * mbs + k] for k in range(mbs)], self.device
            )
            for j in range(self.accumulation)
        ]

    # ------------------------------------------------------------------ one step

    # The hooks below are what `megaloom.parallel.trainer.ParallelTrainer` overrides.
    @property
    def is_main(self) -> bool:
        """Whether this process writes metrics, plots and progress (rank 0 of a torchrun job)."""
        return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def loss_and_gradients(self, batches: list[MicroBatch], loss_scale: float) -> float:
        """Forward and backward over one global batch; return the mean loss per counted token."""
        denominator = float(sum(mb.loss_mask.sum().item() for mb in batches))
        return forward_backward(self.model, batches, denominator, self.cfg.precision, loss_scale)

    def clip_gradients(self) -> float:
        """Clip to `train.grad_clip`; return the pre-clip global gradient norm."""
        return clip_grad_norm(self.params, self.cfg.grad_clip)

    def stop_requested(self) -> bool:
        return self._stop_signal is not None

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
        elapsed = time.perf_counter() - started
        tokens = sum(mb.inputs.numel() for mb in batches)
        record = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens / elapsed,
            "step_time_s": elapsed,
            "skipped": skipped,
        }
        if self.scaler:
            record["loss_scale"] = self.scaler.scale
        return record

    @torch.no_grad()
    def evaluate(self, data: Sequence[np.ndarray] | None = None) -> float | None:
        """Mean loss per token over the first `eval_iters` micro-batches of the valid split."""
        data = self.valid_data if data is None else data
        if data is None:
            return None
        self.model.eval()
        mbs = self.cfg.micro_batch_size
        batches = min(self.cfg.eval_iters, len(data) // mbs)
        total, count = 0.0, 0.0
        for i in range(batches):
            mb = MicroBatch.from_samples([data[i * mbs + k] for k in range(mbs)], self.device)
            with autocast_context(self.cfg.precision, self.device):
                logits = self.model(mb.inputs)
            total += lm_loss(logits, mb.targets, self.model.config.vocab_size, mb.loss_mask,
                             reduction="sum").item()
            count += mb.loss_mask.sum().item()
        return total / count if count else None

    # ------------------------------------------------------------------ loop

    def run(self) -> TrainResult:
        """Train until `max_steps` (or `exit_at_step`, or a signal); save and plot at the end."""
        cfg = self.cfg
        end = cfg.max_steps if cfg.exit_at_step is None else min(cfg.exit_at_step, cfg.max_steps)
        metrics = MetricsLog(self.out_dir, cfg.tensorboard)
        previous = self._install_signal_handlers()
        last_loss = val_loss = None
        last_saved = ckpt.find_latest(self.out_dir) if self.out_dir.exists() else None
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
                                tok_s=f"{record['tokens_per_s']:.0f}")
                if self.step % cfg.save_interval == 0:
                    last_saved = self.save()
            if last_saved is None or last_saved.name != ckpt.step_dir_name(self.step):
                last_saved = self.save()
        finally:
            bar.close()
            metrics.close()
            self._restore_signal_handlers(previous)
        if self.is_main and (self.out_dir / "metrics.jsonl").stat().st_size:
            plot_loss(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
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
