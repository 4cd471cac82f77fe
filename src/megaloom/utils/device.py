"""Device selection: the device is configuration (`auto`, `cpu`, or an accelerator name)."""

from __future__ import annotations

import torch

from megaloom.config import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks the current accelerator when one is available, else the CPU."""
    if name == "auto":
        if torch.accelerator.is_available():
            return torch.accelerator.current_accelerator()
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r} (auto, cpu or an accelerator)") from exc
    if device.type != "cpu" and not torch.accelerator.is_available():
        raise ConfigError(f"device {name!r} requested but no accelerator is available")
    return device


def native_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX-512 BW/VL/DQ or AVX-NE-CONVERT)."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()
