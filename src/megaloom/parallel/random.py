"""RNG streams for dropout under tensor parallelism.

Where activations are replicated over tp (residual dropout without sequence parallelism), every
tp rank must drop the same elements: the default generator is seeded identically on all of them.
Where activations are sharded (attention heads, sequence shards), each tp rank must draw
differently: those regions run inside `tracker.fork(TP_STREAM)`, a generator seeded per tp rank.
Pipeline stages get distinct seeds, as in Megatron (seed + 100 * pp_rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from megaloom.parallel.topology import Topology

TP_STREAM = "tensor-parallel"
TP_SEED_OFFSET = 2718


class RNGTracker:
    """Named generator states swapped into the default CPU (and accelerator) generator."""

    def __init__(self, device: torch.device):
        self.device = device
        self.states: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        accel = None
        if self.device.type != "cpu":
            accel = torch.get_device_module(self.device.type).get_rng_state(self.device)
        return torch.get_rng_state(), accel

    def _set(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.get_device_module(self.device.type).set_rng_state(state[1], self.device)

    def add(self, name: str, seed: int) -> None:
        """Create stream `name` seeded with `seed`, leaving the default generator untouched."""
        saved = self._get()
        torch.manual_seed(seed)
        self.states[name] = self._get()
        self._set(saved)

    @contextlib.contextmanager
    def fork(self, name: str) -> Iterator[None]:
        """Draw from stream `name` inside the block; the default stream resumes afterwards."""
        saved = self._get()
        self._set(self.states[name])
        try:
            yield
        finally:
            self.states[name] = self._get()
            self._set(saved)


def seed_everything(seed: int, topo: Topology) -> RNGTracker:
    """Seed the default generator (same over tp and dp, distinct per stage) and the tp stream."""
    base = seed + 100 * topo.pp_axis.rank
    torch.manual_seed(base)
    tracker = RNGTracker(topo.device)
    tracker.add(TP_STREAM, base + TP_SEED_OFFSET + topo.tp_axis.rank)
    return tracker
