"""Knowledge distillation: the student learns the teacher's next-token distributions on
pretraining windows (`task.name=distill`, `task.distill.*`).

The teacher runs beside the student on the same layout: every rank builds its own tp shard of
the teacher (`attach`, the trainer's adapt hook) and, at the head, both models' vocabulary
slices meet in the vocab-parallel KL, so no rank holds either whole model or gathers logits.
Pipeline parallelism is refused: the teacher's stages would need a pipeline of their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megaloom.config import ConfigError, DistillConfig, ModelConfig
from megaloom.loading import open_weights
from megaloom.parallel.build import build_shard
from megaloom.parallel.loss import vocab_parallel_kl
from megaloom.parallel.pipeline import stage_forward
from megaloom.parallel.topology import Axis, Topology
from megaloom.tasks.lm import LanguageModelTask
from megaloom.train.precision import autocast_context


class DistillTask:
    """Samples are token windows as for pretraining; the loss is T^2 KL(teacher || student)
    per token plus `hard_weight` x the next-token cross-entropy."""

    name = "distill"

    def __init__(self, student: ModelConfig, cfg: DistillConfig, sequence_parallel: bool,
                 precision: str = "fp32"):
        teacher_config, _, self.source = open_weights(cfg.teacher)
        self.teacher_config = teacher_config.model
        for field in ("vocab_size", "padded_vocab_size"):
            if getattr(self.teacher_config, field) != getattr(student, field):
                raise ConfigError(
                    f"task.distill.teacher={cfg.teacher}: its {field} is "
                    f"{getattr(self.teacher_config, field)}, the student's "
                    f"{getattr(student, field)}; distillation compares distributions over "
                    f"one vocabulary")
        if self.teacher_config.num_labels or student.num_labels:
            raise ConfigError("task.name=distill distils language models, not classifiers")
        self.cfg, self.sequence_parallel, self.precision = cfg, sequence_parallel, precision
        self.lm = LanguageModelTask(student.vocab_size)
        self.teacher: torch.nn.Module | None = None

    def attach(self, model: torch.nn.Module, topo: Topology, tracker) -> None:
        """Build this rank's teacher shard on `topo` (the trainer's adapt hook)."""
        if topo.pp > 1:
            raise ConfigError("task.name=distill runs with parallel.pp=1 (the teacher's "
                              "stages would need their own pipeline); use tp and dp")
        self.teacher = build_shard(self.teacher_config, topo, self.source,
                                   self.sequence_parallel, tracker).eval()
        self.teacher.requires_grad_(False)

    def batch(self, samples: Sequence[np.ndarray], device: torch.device
              ) -> dict[str, torch.Tensor]:
        return self.lm.batch(samples, device)

    def loss_sum(self, output: torch.Tensor, batch: dict[str, torch.Tensor],
                 axis: Axis) -> torch.Tensor:
        tokens = batch["tokens"]
        with torch.no_grad(), autocast_context(self.precision, tokens.device):
            teacher = stage_forward(self.teacher, tokens, batch)
        losses = vocab_parallel_kl(output, teacher, axis, self.lm.vocab_size,
                                   self.cfg.temperature)
        loss = (losses * batch["loss_mask"]).sum()
        if self.cfg.hard_weight:
            loss = loss + self.cfg.hard_weight * self.lm.loss_sum(output, batch, axis)
        return loss

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return self.lm.count(batch)
