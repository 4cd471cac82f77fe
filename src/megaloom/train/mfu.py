"""Model FLOP/s and MFU of training steps, in the planner's convention, so a measured run and
`megaloom plan` speak of the same quantity.

Model FLOPs per token are `megaloom.plan.flops.model_flops_per_token`: 6 N + 12 L h s (N the
parameters in matrix products, recomputation not counted; a LoRA run is counted as the full
model, as the papers count fine-tuning). Per device = tokens/s x that / devices. The peak is
`train.peak_tflops` when set, else the planner's GPU table entry for the detected CUDA device
and the run's precision; on CPU (or an unknown GPU) there is none, and only the model TFLOP/s
per device is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megaloom.config import Config
from megaloom.plan.flops import model_flops_per_token
from megaloom.plan.gpus import TERA, detect_peak_flops

CONVENTION = "model FLOPs 6N + 12Lhs per token (no recomputation), per device"


@dataclass(frozen=True)
class FlopsMeter:
    flops_per_token: float
    devices: int
    peak_flops: float | None  # dense peak per device, FLOP/s

    @classmethod
    def for_run(cls, config: Config, device: torch.device, devices: int) -> FlopsMeter:
        peak = config.train.peak_tflops
        return cls(model_flops_per_token(config.model), devices,
                   peak * TERA if peak else detect_peak_flops(device, config.train.precision))

    def figures(self, tokens_per_s: float) -> dict[str, float]:
        """`model_tflops` per device, and `mfu` against the peak when one is known."""
        achieved = tokens_per_s * self.flops_per_token / self.devices
        out = {"model_tflops": achieved / TERA}
        if self.peak_flops:
            out["mfu"] = achieved / self.peak_flops
        return out

    def describe(self) -> str:
        peak = (f"peak {self.peak_flops / TERA:g} TFLOP/s per device" if self.peak_flops
                else "no known peak (set train.peak_tflops for MFU)")
        return f"MFU: {CONVENTION}, {self.flops_per_token:.4g} FLOPs per token; {peak}"


def progress_rate(record: dict) -> dict[str, str]:
    """The progress bar's rate field of a step record: MFU when known, else TFLOP/s."""
    if "mfu" in record:
        return {"mfu": f"{record['mfu']:.1%}"}
    return {"tflops": f"{record['model_tflops']:.3g}"} if "model_tflops" in record else {}
