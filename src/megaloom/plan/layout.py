"""A parallel layout to plan for (tp x pp x dp, batches, recomputation, precision) and its checks.

Owns `Layout`, `PlanError` and the rules a layout must satisfy against a model:

- tp stays within a node and divides the query heads, the kv heads and the MLP width (each
  tensor-parallel rank holds whole kv groups, as `megaloom.model.gpt` lays out `qkv`);
- pp x vpp divides the number of layers: stages are even (Megatron's default rule; no uneven
  first/last stages);
- the GPU count is a multiple of tp x pp; data parallelism takes the rest;
- the global batch is a multiple of micro-batch x dp; with interleaving (vpp > 1) the number of
  micro-batches per pipeline is a multiple of pp (Megatron's interleaved-schedule rule).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megaloom.config import ModelConfig
from megaloom.errors import MegaloomError

Recompute = Literal["none", "selective", "full"]
RECOMPUTE_CHOICES: tuple[str, ...] = ("none", "selective", "full")
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32")


class PlanError(MegaloomError):
    """An impossible layout or planner input, with a message naming the offending option."""


@dataclass(frozen=True)
class Layout:
    """How a training run is spread over `gpus` GPUs; dp = gpus / (tp * pp)."""

    gpus: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    micro_batch: int = 1
    global_batch: int = 1
    recompute: Recompute = "none"
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    precision: str = "bf16"
    grad_dtype: str = "fp32"

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches each pipeline runs per iteration (m)."""
        return self.global_batch // (self.micro_batch * self.dp)

    def validate(self, model: ModelConfig, gpus_per_node: int = 8) -> Layout:
        """Raise `PlanError` naming the first rule this layout breaks; return self otherwise."""
        for name in ("gpus", "tp", "pp", "vpp", "micro_batch", "global_batch"):
            _check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, "
                                              f"got {getattr(self, name)}")
        _check(self.recompute in RECOMPUTE_CHOICES,
               f"--recompute must be one of {', '.join(RECOMPUTE_CHOICES)}")
        _check(self.precision in PRECISIONS,
               f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        _check(self.grad_dtype in ("fp32", "bf16"),
               f"--grad-dtype must be fp32 or bf16, got {self.grad_dtype!r}")
        _check(self.precision != "fp32" or self.grad_dtype == "fp32",
               "--grad-dtype bf16 needs 16-bit training (--precision bf16 or fp16)")
        _check(self.tp <= gpus_per_node,
               f"--tp {self.tp} spans more than one node (--gpus-per-node {gpus_per_node})")
        for what, size in (("model.num_heads", model.num_heads),
                           ("model.num_kv_heads", model.num_kv_heads),
                           ("model.ffn_hidden_size", model.ffn_hidden_size)):
            _check(size % self.tp == 0, f"--tp {self.tp} does not divide {what}={size}")
        _check(self.gpus % (self.tp * self.pp) == 0,
               f"--gpus {self.gpus} is not divisible by tp x pp = {self.tp} x {self.pp}")
        _check(self.vpp == 1 or self.pp > 1, "--vpp > 1 (interleaving) needs --pp > 1")
        _check(model.num_layers % (self.pp * self.vpp) == 0,
               f"model.num_layers={model.num_layers} is not divisible by pp x vpp = "
               f"{self.pp} x {self.vpp} (stages must be even)")
        _check(self.global_batch % (self.micro_batch * self.dp) == 0,
               f"--global-batch {self.global_batch} is not divisible by micro-batch x dp = "
               f"{self.micro_batch} x {self.dp}")
        _check(self.vpp == 1 or self.num_micro_batches % self.pp == 0,
               f"interleaving needs the micro-batches per pipeline ({self.num_micro_batches}) "
               f"to be a multiple of pp={self.pp}")
        return self


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise PlanError(message)
