"""Helpers shared by the benchmark scripts: machine description and JSON output."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "accelerator": str(torch.accelerator.current_accelerator())
        if torch.accelerator.is_available() else None,
    }


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")
