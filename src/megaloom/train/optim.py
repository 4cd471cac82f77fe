"""Megatron's AdamW parameter groups: no weight decay on biases, norms and embeddings.

The trainer's AdamW itself is `megaloom.parallel.data_parallel.ParallelOptimizer` (PyTorch's
fused kernel over these groups, on one process or any layout)."""

from __future__ import annotations

from torch import nn


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
