"""Learning-rate schedule: linear warmup, then cosine / linear / constant decay to `min_lr`.

The rate is a pure function of the step, so resuming needs no scheduler state.
"""

from __future__ import annotations

import math

from megaloom.config import TrainConfig


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return cfg.lr
    decay_steps = cfg.lr_decay_steps if cfg.lr_decay_steps is not None else cfg.max_steps
    span = max(decay_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    if cfg.lr_decay == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        coeff = 1.0 - progress
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
