"""Gradual magnitude pruning while training (Zhu & Gupta 2017, "To prune, or not to prune").

From `start_step`, every `interval` steps until `end_step`, each target weight is masked to
the sparsity of the cubic schedule `s_t = s_f + (s_i - s_f) (1 - (t - t0) / (end - t0))^3`
by its own magnitudes (`masks.magnitude_mask`, layout-independent), and the masks are applied
again after every optimizer step so pruned weights stay zero. The masks are checkpointed as
`mask/NAME` chunks beside the weights (each rank its own boxes), so a resumed run, under any
layout, continues exactly. Sparsity overall and per layer goes to `metrics.jsonl`.
"""

from __future__ import annotations

import logging

import torch

from megaloom.checkpoint.shards import ShardWriter
from megaloom.compress.masks import (
    layer_of,
    local_real,
    magnitude_mask,
    pruned_parameters,
)
from megaloom.config import PruningConfig
from megaloom.model.gpt import GPT
from megaloom.parallel.build import owned_boxes, real_part
from megaloom.parallel.layers import shard_box
from megaloom.parallel.topology import Topology

log = logging.getLogger(__name__)
MASK_PREFIX = "mask/"


def end_step(cfg: PruningConfig, max_steps: int) -> int:
    return max_steps if cfg.end_step is None else cfg.end_step


def scheduled_sparsity(step: int, cfg: PruningConfig, max_steps: int) -> float:
    """The schedule's sparsity after `step` completed steps (held between updates)."""
    end = end_step(cfg, max_steps)
    if step < cfg.start_step:
        return 0.0
    if step >= end:
        return cfg.sparsity
    last = cfg.start_step + (step - cfg.start_step) // cfg.interval * cfg.interval
    progress = (last - cfg.start_step) / (end - cfg.start_step)
    return cfg.sparsity + (cfg.initial_sparsity - cfg.sparsity) * (1.0 - progress) ** 3


def is_update_step(step: int, cfg: PruningConfig, max_steps: int) -> bool:
    end = end_step(cfg, max_steps)
    return cfg.start_step <= step <= end and (
        (step - cfg.start_step) % cfg.interval == 0 or step == end)


class GradualPruner:
    """Masks of this rank's target weights, updated on the schedule (collective)."""

    def __init__(self, model: GPT, topo: Topology, cfg: PruningConfig, max_steps: int):
        self.model, self.topo, self.cfg, self.max_steps = model, topo, cfg, max_steps
        self.params = pruned_parameters(model, cfg.targets)
        self.masks: dict[str, torch.Tensor] | None = None
        self.target = 0.0
        self.figures: dict = {"sparsity": 0.0, "sparsity_target": 0.0}

    def begin(self, step: int) -> None:
        """At the start of a run: masks for a run that has passed `start_step` without any
        (pruning switched on for a continued run)."""
        if self.masks is None and step >= self.cfg.start_step:
            self.update(scheduled_sparsity(step, self.cfg, self.max_steps))

    def after_step(self, step: int) -> None:
        """After the optimizer step that completed `step`: new masks on schedule, else the
        current ones re-applied."""
        if is_update_step(step, self.cfg, self.max_steps):
            self.update(scheduled_sparsity(step, self.cfg, self.max_steps))
        elif self.masks is not None:
            self.apply()

    @torch.no_grad()
    def update(self, sparsity: float) -> None:
        self.target = sparsity
        self.masks = {key: magnitude_mask(param, sparsity, self.topo.tp_axis)
                      for key, param in self.params.items()}
        self.apply()
        self.figures = self.measure()

    @torch.no_grad()
    def apply(self) -> None:
        for key, param in self.params.items():
            param.mul_(self.masks[key])

    def measure(self) -> dict:
        """Sparsity overall and per layer over the whole model (collective): every element
        is counted once over the layout (`owned_boxes`)."""
        layers = [str(i) for i in range(self.model.config.num_layers)] + ["embed", "lm_head"]
        counts = torch.zeros(2, len(layers), dtype=torch.float64)
        for key, param, _, _ in owned_boxes(self.model, self.topo):
            if key in self.masks:
                real = local_real(self.masks[key], param, self.topo.tp_axis)
                column = layers.index(layer_of(key))
                counts[0, column] += real.numel() - int(real.sum())
                counts[1, column] += real.numel()
        counts = self.topo.world_axis.all_reduce(counts.to(self.topo.device)).cpu()
        zeros, totals = counts.tolist()
        return {"sparsity": sum(zeros) / sum(totals), "sparsity_target": self.target,
                "sparsity_layers": {name: z / t for name, z, t in zip(layers, zeros, totals,
                                                                      strict=True) if t}}

    def write(self, writer: ShardWriter) -> None:
        """Add this rank's boxes of the masks to a checkpoint (uint8)."""
        if self.masks is None:
            return
        for key, _, full_shape, box in owned_boxes(self.model, self.topo):
            if key in self.masks:
                writer.add(MASK_PREFIX + key, full_shape, box,
                           real_part(self.masks[key], box).to(torch.uint8))

    def state(self) -> dict:
        return {"sparsity_target": self.target, "masks": self.masks is not None}

    @torch.no_grad()
    def read(self, checkpoint, state: dict | None) -> None:
        """This rank's boxes of the masks a checkpoint holds (none: no mask yet)."""
        if not (state or {}).get("masks"):
            return
        self.masks = {}
        for key, param in self.params.items():
            full_shape, box = shard_box(param, self.topo.tp_axis)
            mask = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
            local_real(mask, param, self.topo.tp_axis).copy_(
                checkpoint.read(MASK_PREFIX + key, full_shape, box).bool())
            self.masks[key] = mask
        self.target = float(state["sparsity_target"])
        self.figures = self.measure()
        log.info("pruning masks restored (sparsity %.4f)", self.figures["sparsity"])
