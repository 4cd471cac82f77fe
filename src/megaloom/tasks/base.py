"""The `Task` seam between data and the trainer, and epoch-shuffled access to a finite set.

A task turns a list of samples (whatever its dataset yields) into one micro-batch: a dict of
tensors that always holds `tokens` (batch, seq) and may hold `positions` and `attn_mask`
(`megaloom.parallel.pipeline` passes them to every stage). On the last pipeline stage,
`loss_sum` turns the stage output (this tp rank's slice of the head's outputs) into a summed
loss, and `count` says what that sum is normalised by (trained tokens, or rows): the trainer
divides by the global count over all micro-batches and dp ranks, so gradient accumulation and
data parallelism never change the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch

from megaloom.parallel.topology import Axis


class Task(Protocol):
    name: str

    def batch(self, samples: Sequence[Any], device: torch.device) -> dict[str, torch.Tensor]:
        """One micro-batch from `samples`."""
        ...

    def loss_sum(self, output: torch.Tensor, batch: dict[str, torch.Tensor],
                 axis: Axis) -> torch.Tensor:
        """The summed (unnormalised) loss of a micro-batch from this rank's head output."""
        ...

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        """What the loss of `batch` is normalised by (summed over the global batch)."""
        ...


def stack(samples: Sequence[dict[str, np.ndarray]], key: str, device: torch.device,
          dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """`samples[i][key]` stacked into one tensor on `device`."""
    return torch.from_numpy(np.stack([s[key] for s in samples])).to(device=device, dtype=dtype)


class EpochShuffled(Sequence):
    """`rows` repeated over epochs, each epoch in its own order: index `i` is row
    `perm(i // n)[i % n]` with `perm(e)` a permutation seeded by (seed, e), so the sample at
    any global index is a pure function of the index (resume stays exact)."""

    def __init__(self, rows: Sequence[Any], seed: int):
        if not rows:
            raise ValueError("no rows to train on")
        self.rows, self.seed = rows, seed
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        epoch, offset = divmod(int(index), len(self.rows))
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            self._orders = {epoch: order}
        return self.rows[int(order[offset])]
