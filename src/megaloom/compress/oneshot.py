"""One-shot pruning of a trained model (`megaloom prune`): magnitude or Wanda scores, masks
that are unstructured or N:M, written back as an ordinary checkpoint (zeros stored as zeros).

- `magnitude`: score |W|; unstructured masks compare each whole tensor (the layer-wise
  magnitude baseline of Sun et al. 2023).
- `wanda` (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): score
  |W_ij| * ||X_j||_2, X_j the j-th input feature over the calibration tokens; unstructured
  masks compare within each output row, as the paper does. The input norms come from one pass
  of the dense model over the calibration windows (the paper feeds each block the outputs of
  the already-pruned blocks before it).
- `N:M` (e.g. 2:4, 4:8): in every run of M consecutive inputs of a row, the N best scores are
  kept; the sparsity is 1 - N/M.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from megaloom.compress.masks import layer_of, pruned_parameters
from megaloom.errors import MegaloomError
from megaloom.model.gpt import GPT

METHODS = ("magnitude", "wanda")


@dataclass(frozen=True)
class Pattern:
    """Unstructured (`n` is None) or `n` kept in every `m` consecutive inputs."""

    n: int | None = None
    m: int | None = None

    @classmethod
    def parse(cls, text: str) -> Pattern:
        if text == "unstructured":
            return cls()
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match or not 0 < int(match.group(1)) < int(match.group(2)):
            raise MegaloomError(f"--pattern must be unstructured or N:M with 0 < N < M "
                                f"(e.g. 2:4), got {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def sparsity(self) -> float | None:
        return None if self.n is None else 1.0 - self.n / self.m

    def __str__(self) -> str:
        return "unstructured" if self.n is None else f"{self.n}:{self.m}"


def keep_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern, per_row: bool
              ) -> torch.Tensor:
    """Bool mask keeping the best `scores` (rows: outputs, columns: inputs)."""
    rows, cols = scores.shape
    if pattern.n is not None:
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        best = groups.topk(pattern.n, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, best, True)
        return mask.reshape(rows, cols)
    if per_row:
        pruned = round(sparsity * cols)
        mask = torch.ones_like(scores, dtype=torch.bool)
        if pruned:
            mask.scatter_(1, scores.argsort(dim=1)[:, :pruned], False)
        return mask
    pruned = round(sparsity * scores.numel())
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    if pruned:
        mask[scores.flatten().argsort()[:pruned]] = False
    return mask.reshape(rows, cols)


@torch.no_grad()
def input_norms(model: GPT, modules: dict[str, nn.Module], windows: Sequence[torch.Tensor],
                batch_size: int = 8) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every input feature of `modules` over all tokens of `windows` (one dense
    forward pass of `model`, hooks on the modules)."""
    squares = {key: torch.zeros(m.weight.shape[1], dtype=torch.float64)
               for key, m in modules.items()}

    def hook(key):
        def record(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            squares[key] += (x * x).sum(0).cpu()
        return record

    handles = [m.register_forward_hook(hook(key)) for key, m in modules.items()]
    try:
        model.eval()
        for start in tqdm(range(0, len(windows), batch_size), desc="calibrate", unit="batch"):
            model(torch.stack(list(windows[start:start + batch_size])))
    finally:
        for handle in handles:
            handle.remove()
    return {key: value.sqrt().float() for key, value in squares.items()}


def weight_modules(model: GPT, keys: Sequence[str]) -> dict[str, nn.Module]:
    """The (linear) module whose `weight` is each stored key."""
    found = {f"{name}.weight": m for name, m in model.named_modules()
             if isinstance(getattr(m, "weight", None), nn.Parameter)}
    return {key: found[key] for key in keys}


@torch.no_grad()
def prune_model(model: GPT, method: str, sparsity: float | None, pattern: Pattern,
                targets: list[str], windows: Sequence[torch.Tensor] = ()) -> dict:
    """Prune `model` in place; return the report (sparsity per tensor, per layer, overall)."""
    if method not in METHODS:
        raise MegaloomError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if pattern.sparsity is not None:
        if sparsity is not None and abs(sparsity - pattern.sparsity) > 1e-9:
            raise MegaloomError(f"--pattern {pattern} prunes {pattern.sparsity:g} of the "
                                f"weights; drop --sparsity or give {pattern.sparsity:g}")
        sparsity = pattern.sparsity
    if sparsity is None or not 0.0 < sparsity < 1.0:
        raise MegaloomError(f"--sparsity must be in (0, 1), got {sparsity}")
    params = pruned_parameters(model, targets)
    if method == "wanda":
        if "embed" in targets:
            raise MegaloomError("wanda scores a weight by its inputs; the embedding has none "
                                "(prune it with --method magnitude, or leave it out of --targets)")
        if not windows:
            raise MegaloomError("--method wanda needs --calibration text")
        norms = input_norms(model, weight_modules(model, list(params)), windows)
    report: dict = {"method": method, "pattern": str(pattern), "sparsity": sparsity,
                    "tensors": {}}
    for key, param in params.items():
        if pattern.n is not None and param.shape[1] % pattern.m:
            raise MegaloomError(f"{key} has {param.shape[1]} inputs, not a multiple of "
                                f"{pattern.m} for --pattern {pattern}")
        scores = param.detach().abs().float()
        if method == "wanda":
            scores = scores * norms[key][None, :]
        mask = keep_mask(scores, sparsity, pattern, per_row=method == "wanda")
        param.mul_(mask.to(param.dtype))
        report["tensors"][key] = 1.0 - float(mask.float().mean())
    zeros = sum(p.numel() - int(p.count_nonzero()) for p in params.values())
    total = sum(p.numel() for p in params.values())
    report["overall"] = zeros / total
    layers: dict[str, list[int]] = {}
    for key, param in params.items():
        counts = layers.setdefault(layer_of(key), [0, 0])
        counts[0] += param.numel() - int(param.count_nonzero())
        counts[1] += param.numel()
    report["layers"] = {name: z / t for name, (z, t) in layers.items()}
    report["calibration_windows"] = len(windows) if method == "wanda" else 0
    return report
