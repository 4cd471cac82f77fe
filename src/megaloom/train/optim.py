"""AdamW with Megatron's parameter groups: no weight decay on biases, norms and embeddings."""

from __future__ import annotations

import torch
from torch import nn

from megaloom.config import TrainConfig


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


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """PyTorch's fused AdamW kernel (CPU and CUDA): one pass over all parameters per step,
    far faster than the per-tensor loop PyTorch picks by default on CPU."""
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=True,
    )
