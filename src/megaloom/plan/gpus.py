"""The GPU table: memory and dense peak FLOP/s of the accelerators megaloom plans for.

Shared by `megaloom plan` and by the trainer's MFU figure (`detect_peak_flops`), so both use
the same peaks. Peaks are the vendor's dense (no sparsity) tensor-core figures for 16-bit
math and the plain (non-tensor-core) fp32 figure; memory is the marketed capacity, taken as
GiB (2^30 bytes). The allocator sees a little less, which the planner's fixed allowance covers.
This module must not import torch at import time (the planner runs without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megaloom.plan.layout import PlanError

if TYPE_CHECKING:
    import torch

GIB = 2**30
TERA = 1e12


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator: `memory_bytes` and dense peak FLOP/s per precision (None: unsupported)."""

    name: str
    memory_bytes: int
    peak_flops: dict[str, float | None]
    # Substrings of `torch.cuda.get_device_name()` that identify this exact part; every
    # substring of one tuple must appear (case-insensitive).
    device_names: tuple[tuple[str, ...], ...]

    def peak(self, precision: str) -> float:
        """Dense peak FLOP/s for `precision` (bf16, fp16 or fp32); errors if unsupported."""
        if precision not in self.peak_flops:
            raise PlanError(f"unknown precision {precision!r}; use one of "
                                f"{', '.join(self.peak_flops)}")
        value = self.peak_flops[precision]
        if value is None:
            raise PlanError(f"{self.name} has no {precision} tensor cores; "
                                "use --precision fp16")
        return value


GPUS: dict[str, GPUSpec] = {
    spec.name.lower(): spec
    for spec in (
        GPUSpec("V100", 32 * GIB, {"bf16": None, "fp16": 125 * TERA, "fp32": 15.7 * TERA},
                (("v100", "sxm"),)),
        GPUSpec("A100-40GB", 40 * GIB, {"bf16": 312 * TERA, "fp16": 312 * TERA,
                                        "fp32": 19.5 * TERA},
                (("a100", "40gb"),)),
        GPUSpec("A100-80GB", 80 * GIB, {"bf16": 312 * TERA, "fp16": 312 * TERA,
                                        "fp32": 19.5 * TERA},
                (("a100", "80gb"),)),
        GPUSpec("H100-SXM", 80 * GIB, {"bf16": 989 * TERA, "fp16": 989 * TERA,
                                       "fp32": 67 * TERA},
                (("h100", "sxm"), ("h100", "hbm3"))),
        GPUSpec("H200", 141 * GIB, {"bf16": 989 * TERA, "fp16": 989 * TERA, "fp32": 67 * TERA},
                (("h200",),)),
    )
}

# Parts whose names contain a table entry's substrings but whose peaks differ (PCIe/NVL cards
# run at lower clocks): never mapped, so an MFU is not computed against the wrong peak.
_EXCLUDED_NAME_PARTS = ("pcie", "nvl")


def get_gpu(name: str) -> GPUSpec:
    """Look up a GPU by table name (case-insensitive: `a100-80gb`, `h100-sxm`, ...)."""
    spec = GPUS.get(name.lower())
    if spec is None:
        known = ", ".join(s.name.lower() for s in GPUS.values())
        raise PlanError(f"unknown GPU {name!r}; known: {known}")
    return spec


def gpu_from_device_name(device_name: str) -> GPUSpec | None:
    """The table entry for a CUDA device name such as 'NVIDIA A100-SXM4-80GB', else None."""
    lowered = device_name.lower()
    if "a100" in lowered and "pcie" in lowered:  # A100 PCIe keeps the SXM tensor-core peak
        lowered = lowered.replace("pcie", "")
    if any(part in lowered for part in _EXCLUDED_NAME_PARTS):
        return None
    for spec in GPUS.values():
        if any(all(part in lowered for part in parts) for parts in spec.device_names):
            return spec
    return None


def detect_peak_flops(device: torch.device, precision: str = "bf16") -> float | None:
    """Dense peak FLOP/s of `device` for `precision`, or None on CPU and unknown GPUs.

    For the trainer's MFU: MFU = model FLOPs per second / this peak.
    """
    if device.type == "cpu":
        return None
    import torch

    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None or device.type != accelerator.type or not torch.cuda.is_available():
        return None
    spec = gpu_from_device_name(torch.cuda.get_device_name(device))
    if spec is None:
        return None
    return spec.peak_flops.get(precision)
