"""A parallel layout to plan for (tp x pp x dp, batches, recomputation, precision) and its checks.

Owns `Layout`, `PlanError` and the rules a layout must satisfy against a model:

- the planner's own inputs: sizes >= 1, precision and gradient dtype, the ZeRO stage, tp
  within a node, the GPU count a multiple of tp x pp (data parallelism takes the rest);
- everything the runtime also checks comes from `megaloom.layout_rules`, the one owner of
  layout rules: tp divides the heads, kv heads and MLP width, pp x vpp at most the layers
  (uneven stages split as the runtime splits them), the global batch a multiple of
  micro-batch x dp, and the interleaved schedule's micro-batch rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megaloom.config import ModelConfig
from megaloom.errors import MegaloomError
from megaloom.layout_rules import LayoutSpec, layout_problems

Recompute = Literal["none", "selective", "full"]
RECOMPUTE_CHOICES: tuple[str, ...] = ("none", "selective", "full")
PRECISIONS: tuple[str, ...] = ("bf16", "fp16", "fp32")
ZERO_STAGES: tuple[int, ...] = (0, 1, 2, 3)


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
    zero: int = 0
    precision: str = "bf16"
    grad_dtype: str = "fp32"

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def distributed_optimizer(self) -> bool:
        """Optimizer state sharded over dp: ZeRO stage 1 and above."""
        return self.zero >= 1

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches each pipeline runs per iteration (m)."""
        return self.global_batch // (self.micro_batch * self.dp)

    def validate(self, model: ModelConfig, gpus_per_node: int = 8) -> Layout:
        """Raise `PlanError` naming the first rule this layout breaks; return self otherwise."""
        for name in ("gpus", "tp", "pp", "vpp", "micro_batch", "global_batch"):
            _check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, "
                                              f"got {getattr(self, name)}")
        _check(self.zero in ZERO_STAGES, f"--zero must be one of 0, 1, 2, 3, got {self.zero}")
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
        _check(self.gpus % (self.tp * self.pp) == 0,
               f"--gpus {self.gpus} is not divisible by tp x pp = {self.tp} x {self.pp}")
        spec = LayoutSpec(tp=self.tp, pp=self.pp, vpp=self.vpp, dp=self.dp,
                          sequence_parallel=self.sequence_parallel,
                          micro_batch=self.micro_batch, global_batch=self.global_batch)
        for _key, message in layout_problems(model, spec)[:1]:
            raise PlanError(message)
        return self


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise PlanError(message)
