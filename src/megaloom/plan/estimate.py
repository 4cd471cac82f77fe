"""One plan: parameters, memory per GPU, FLOPs and time of a model on a parallel layout.

Time model: while computing, each GPU sustains a hardware FLOP rate, given either as
`tflops` (hardware TFLOP/s per GPU, recomputation counted) or as `mfu` (that rate as a
fraction of the GPU's dense peak for the precision). The pipeline bubble adds idle time on
top:

    seconds per iteration = hardware FLOPs per iteration / (GPUs x rate) x (1 + bubble)

`achieved_tflops` is instead an end-to-end rate, bubble included (the per-GPU figure papers
such as MT-NLG's report from measured iteration times): the busy rate is then
`achieved x (1 + bubble)`, and the time is hardware FLOPs / (GPUs x achieved).

Data-parallel and tensor-parallel communication are assumed hidden (overlapped) or folded
into the rate. The end-to-end MFU that follows (model FLOPs, no recomputation, over peak) is
reported. Memory is evaluated on the first and the last pipeline stage, the two largest: a
middle stage holds fewer micro-batches than the first and neither embeddings nor head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megaloom.config import ModelConfig
from megaloom.plan.flops import (
    bubble_fraction,
    hardware_flops_per_token,
    model_flops_per_token,
)
from megaloom.plan.gpus import GIB, TERA, GPUSpec
from megaloom.plan.layout import Layout, PlanError
from megaloom.plan.memory import StageMemory, stage_memory
from megaloom.plan.params import StageParams, count_parameters, stage_parameters

DEFAULT_ALLOWANCE_BYTES = 2 * GIB  # CUDA context, communication buffers, fragmentation
DEFAULT_MFU = 0.4


@dataclass(frozen=True)
class Plan:
    """Everything the planner derives for one (model, layout, GPU, rate)."""

    model: ModelConfig
    layout: Layout
    gpu: GPUSpec
    parameters: int
    stages: list[StageParams]
    memory: list[StageMemory]
    model_flops_per_token: float
    hardware_flops_per_token: float
    bubble: float
    rate_flops: float
    peak_flops: float
    tokens: float | None = None

    @property
    def peak_memory_bytes(self) -> float:
        return max(m.total for m in self.memory)

    @property
    def fits(self) -> bool:
        return self.peak_memory_bytes <= self.gpu.memory_bytes

    @property
    def tokens_per_iteration(self) -> int:
        return self.layout.global_batch * self.model.seq_len

    @property
    def model_flops_per_iteration(self) -> float:
        return self.model_flops_per_token * self.tokens_per_iteration

    @property
    def hardware_flops_per_iteration(self) -> float:
        return self.hardware_flops_per_token * self.tokens_per_iteration

    @property
    def seconds_per_iteration(self) -> float:
        compute = self.hardware_flops_per_iteration / (self.layout.gpus * self.rate_flops)
        return compute * (1.0 + self.bubble)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_iteration / self.seconds_per_iteration

    @property
    def mfu(self) -> float:
        """End-to-end model FLOPs utilisation implied by the time estimate."""
        achieved = self.model_flops_per_iteration / self.seconds_per_iteration / self.layout.gpus
        return achieved / self.peak_flops

    @property
    def iterations(self) -> int | None:
        return None if self.tokens is None else math.ceil(self.tokens / self.tokens_per_iteration)

    @property
    def total_seconds(self) -> float | None:
        iterations = self.iterations
        return None if iterations is None else iterations * self.seconds_per_iteration

    def to_dict(self) -> dict:
        """Plain data for `--json` (bytes, FLOPs and seconds in base units)."""
        layout = self.layout
        return {
            "model": {
                "arch": self.model.arch, "num_layers": self.model.num_layers,
                "hidden_size": self.model.hidden_size, "num_heads": self.model.num_heads,
                "num_kv_heads": self.model.num_kv_heads,
                "ffn_hidden_size": self.model.ffn_hidden_size, "seq_len": self.model.seq_len,
                "padded_vocab_size": self.model.padded_vocab_size,
            },
            "layout": {
                "gpus": layout.gpus, "tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp,
                "dp": layout.dp, "micro_batch": layout.micro_batch,
                "global_batch": layout.global_batch,
                "num_micro_batches": layout.num_micro_batches, "recompute": layout.recompute,
                "sequence_parallel": layout.sequence_parallel,
                "distributed_optimizer": layout.distributed_optimizer, "zero": layout.zero,
                "precision": layout.precision, "grad_dtype": layout.grad_dtype,
            },
            "gpu": {"name": self.gpu.name, "memory_bytes": self.gpu.memory_bytes,
                    "peak_flops": self.peak_flops},
            "parameters": {"total": self.parameters,
                           "stages": [s.to_dict() for s in self.stages]},
            "memory": {"stages": [m.to_dict() for m in self.memory],
                       "peak_bytes": self.peak_memory_bytes, "fits": self.fits},
            "flops": {
                "model_per_token": self.model_flops_per_token,
                "hardware_per_token": self.hardware_flops_per_token,
                "model_per_iteration": self.model_flops_per_iteration,
                "hardware_per_iteration": self.hardware_flops_per_iteration,
                "bubble_fraction": self.bubble,
            },
            "time": {
                "rate_flops_per_gpu": self.rate_flops,
                "seconds_per_iteration": self.seconds_per_iteration,
                "tokens_per_iteration": self.tokens_per_iteration,
                "tokens_per_second": self.tokens_per_second, "mfu": self.mfu,
                "tokens": self.tokens, "iterations": self.iterations,
                "total_seconds": self.total_seconds,
            },
        }


def estimate(model: ModelConfig, layout: Layout, gpu: GPUSpec, *, mfu: float | None = None,
             tflops: float | None = None, achieved_tflops: float | None = None,
             tokens: float | None = None, allowance_bytes: float = DEFAULT_ALLOWANCE_BYTES,
             gpus_per_node: int = 8, hfu_convention: str = "eq8") -> Plan:
    """Plan `model` on `layout` over GPUs `gpu`; the rate is `tflops`, `achieved_tflops` or
    `mfu` (default 0.4); selective recomputation's FLOPs counted by `hfu_convention`."""
    model.validate()
    layout.validate(model, gpus_per_node)
    peak = gpu.peak(layout.precision)
    bubble = bubble_fraction(layout.pp, layout.num_micro_batches, layout.vpp)
    given = [name for name, value in (("--mfu", mfu), ("--tflops", tflops),
                                      ("--achieved-tflops", achieved_tflops))
             if value is not None]
    if len(given) > 1:
        raise PlanError(f"give one of {', '.join(given)}, not several")
    if achieved_tflops is not None:
        tflops = achieved_tflops * (1.0 + bubble)
    if tflops is not None:
        if tflops <= 0:
            raise PlanError(f"{given[0]} must be > 0, got {tflops}")
        rate = tflops * TERA
    else:
        mfu = DEFAULT_MFU if mfu is None else mfu
        if not 0 < mfu <= 1:
            raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
        rate = mfu * peak
    if tokens is not None and tokens <= 0:
        raise PlanError(f"--tokens must be > 0, got {tokens}")
    stages = stage_parameters(model, layout.pp, layout.vpp)
    ends = [stages[0]] if layout.pp == 1 else [stages[0], stages[-1]]
    if rate > peak:
        busy = " (busy rate, the bubble added)" if achieved_tflops is not None else ""
        raise PlanError(f"--tflops {rate / TERA:g}{busy} exceeds {gpu.name}'s "
                        f"{layout.precision} dense peak of {peak / TERA:g} TFLOP/s")
    return Plan(
        model=model,
        layout=layout,
        gpu=gpu,
        parameters=count_parameters(model),
        stages=stages,
        memory=[stage_memory(model, layout, s, allowance_bytes) for s in ends],
        model_flops_per_token=model_flops_per_token(model),
        hardware_flops_per_token=hardware_flops_per_token(model, layout.recompute,
                                                          hfu_convention),
        bubble=bubble,
        rate_flops=rate,
        peak_flops=peak,
        tokens=tokens,
    )
