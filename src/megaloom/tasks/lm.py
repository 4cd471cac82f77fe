"""Next-token language modelling: pretraining on token windows, and the loss SFT shares."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from megaloom.parallel.loss import parallel_lm_loss
from megaloom.parallel.topology import Axis


class LanguageModelTask:
    """Samples are int arrays of `seq_len + 1` tokens; every next token is trained."""

    name = "lm"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def batch(self, samples: Sequence[np.ndarray], device: torch.device
              ) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(np.stack(samples).astype(np.int64)).to(device)
        targets = tokens[:, 1:]
        return {"tokens": tokens[:, :-1], "targets": targets,
                "loss_mask": torch.ones_like(targets, dtype=torch.float32)}

    def loss_sum(self, output: torch.Tensor, batch: dict[str, torch.Tensor],
                 axis: Axis) -> torch.Tensor:
        return parallel_lm_loss(output, batch["targets"], axis, self.vocab_size,
                                batch["loss_mask"])

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        return float(batch["loss_mask"].sum().item())
