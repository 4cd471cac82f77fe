"""AdamW: Megatron's parameter groups and PyTorch's fused kernel without `torch.optim.Optimizer`.

`parameter_groups` leaves biases, norms and embeddings undecayed. `FusedAdamW` runs PyTorch's
fused AdamW kernel through its public functional form (`torch.optim.adamw.adamw(...,
fused=True)`), the same update `torch.optim.AdamW(fused=True)` makes, bit for bit (tested).
Why not that class: `torch.optim.Optimizer` wraps `add_param_group`, `step` and `zero_grad` in
`torch._disable_dynamo`, whose first call imports TorchDynamo, Inductor and SymPy, about 45 MB
resident in every rank for a compiler training never calls; on a rank that holds a quarter of a
100M model that is a tenth of its memory. The trainer's optimizer over any layout,
`megaloom.parallel.data_parallel.ParallelOptimizer`, steps a `FusedAdamW`."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.adamw import adamw


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into decayed (matrices) and undecayed (biases, norms, embeddings)."""
    embedding_params = {
        id(module.weight) for module in model.modules() if isinstance(module, nn.Embedding)
    }
    decay, no_decay, seen = [], [], set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim < 2 or id(param) in embedding_params:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class FusedAdamW:
    """AdamW over parameter `groups` (dicts with `params` and `weight_decay`; `lr` may be set
    per group between steps). `state[param]` holds `step` (a float32 scalar tensor, as the
    fused kernel wants), `exp_avg` and `exp_avg_sq`. They are allocated here, not at the first
    update: the memory a run needs is taken before its first step, and the moments sit below
    the activations on the heap instead of in the holes the first step's activations leave."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float):
        self.param_groups = [{"lr": lr, "betas": betas, "eps": eps, **group} for group in groups]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {
            param: {"step": torch.zeros((), dtype=torch.float32, device=param.device),
                    "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}
            for group in self.param_groups for param in group["params"]}

    def steps(self) -> int:
        """Updates made so far (every parameter's count is the same in training)."""
        return max((int(s["step"].item()) for s in self.state.values()), default=0)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the state before any update."""
        for state in self.state.values():
            for tensor in state.values():
                tensor.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self.state[p] for p in params]
            beta1, beta2 = group["betas"]
            adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                  [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
                  fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                  weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
