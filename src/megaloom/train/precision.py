"""Mixed precision: autocast contexts and a dynamic loss scaler for fp16.

Master weights and optimizer state stay fp32 in every mode. The loss scaler is hand-written
(rather than `torch.amp.GradScaler`) because its overflow decision must be a single flag that
distributed ranks can agree on before anyone steps, and its state must checkpoint as plain data.
"""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(precision: str, device: torch.device):
    """Autocast for bf16/fp16, a null context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


class DynamicLossScaler:
    """Scale the loss up to keep fp16 gradients representable; back off on overflow.

    A step overflows when the global gradient norm is not finite
    (`ParallelOptimizer.clip_grad_norm`).
    Overflowing steps are skipped: the scale halves (after `hysteresis` consecutive overflows)
    and grows x2 after `growth_interval` clean steps.
    """

    def __init__(
        self,
        initial_scale: float = 2.0**16,
        growth_interval: int = 1000,
        hysteresis: int = 2,
        min_scale: float = 1.0,
    ):
        self.scale = float(initial_scale)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.min_scale = min_scale
        self.clean_steps = 0
        self.overflows_left = hysteresis

    def update(self, overflow: bool) -> None:
        if overflow:
            self.clean_steps = 0
            self.overflows_left -= 1
            if self.overflows_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
                self.overflows_left = self.hysteresis
            return
        self.clean_steps += 1
        if self.clean_steps % self.growth_interval == 0:
            self.scale *= 2.0
            self.overflows_left = self.hysteresis

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "clean_steps": self.clean_steps,
            "overflows_left": self.overflows_left,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.overflows_left = int(state["overflows_left"])
