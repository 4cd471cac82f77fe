"""The output head at decode time: logits for sampling, and an exact greedy fast path on CPU.

Decoding multiplies a few rows (one per running sequence) by the output head, a
(vocab x hidden) matrix too large to stay in cache between steps, so on CPU each step waits
on memory, and the head alone is about half of it. Two things make it cheaper there:

- **Prepacked weights.** oneDNN's blocked weight layout streams a cache-cold head faster
  than `F.linear` on the training layout at a few rows (`torch.ops.mkldnn`, the ops
  `torch.compile` uses for CPU linears; figures in the README's benchmark table).
- **Screened greedy.** A greedy step only needs the argmax. `PackedHead.greedy` computes all
  logits from a bf16 copy of the weight (half the bytes), bounds the error of every
  approximate logit rigorously (rounding of weights, inputs and output, fp32 accumulation),
  keeps only the tokens whose interval reaches the best lower bound, and recomputes those
  few in fp32 (typically a handful). The true fp32 argmax is always among them, so the
  result is the fp32 greedy token, not an approximation; a row with too many candidates (or
  non-finite values) takes the full fp32 logits instead.

`LogitsHead` is the plain case: the model already returns logits (other devices, tensor
parallelism, weights that cannot be packed).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from megaloom.utils.device import native_bf16

BF16_ROUNDOFF = 2.0**-8  # unit roundoff of bf16 with round-to-nearest
FP32_ROUNDOFF = 2.0**-24
MAX_CANDIDATES = 1024  # beyond this many candidates a row takes the full fp32 logits


def row_argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` for a 2-D tensor (first index on ties, NaN counts as largest).

    On CPU it runs NumPy's vectorised argmax row by row: torch's CPU argmax reduction is
    several times slower, and at decode time it runs over the whole vocabulary every step.
    """
    if logits.device.type != "cpu":
        return logits.argmax(dim=-1)
    rows = logits.detach().float().numpy()
    return torch.tensor([int(row.argmax()) for row in rows], dtype=torch.long)


def packing_supported(weight: torch.Tensor) -> bool:
    """Whether this torch build can prepack `weight` (CPU, oneDNN built in, fp32, or bf16
    where the CPU has bf16 kernels: oneDNN refuses to reorder a bf16 weight elsewhere)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and native_bf16())


def screening_supported(weight: torch.Tensor) -> bool:
    """Whether a bf16 screen speeds up greedy on this machine (fp32 weight, native bf16)."""
    return packing_supported(weight) and weight.dtype == torch.float32 and native_bf16()


def _pack(weight: torch.Tensor, rows_hint: int) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), rows_hint)


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class LogitsHead:
    """The model's output already is the logits over the padded vocabulary."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def greedy(self, out: torch.Tensor) -> torch.Tensor:
        """The argmax over the real vocabulary of each row of `out` (rows, padded_vocab)."""
        return row_argmax(out[:, : self.vocab_size])


class PackedHead:
    """The output head applied by the engine to final hidden states, with the first
    `vocab_size` rows of `lm_head.weight` prepacked for about `rows_hint` rows per call.
    `screen` (default: where the CPU has native bf16) enables the screened greedy path."""

    def __init__(self, lm_head: nn.Linear, vocab_size: int, rows_hint: int,
                 screen: bool | None = None):
        if lm_head.bias is not None:
            raise ValueError("PackedHead supports output heads without bias")
        weight = lm_head.weight.detach()[:vocab_size]
        self.vocab_size = vocab_size
        self.weight = weight
        self.packed = _pack(weight, rows_hint)
        if screen is None:
            screen = screening_supported(weight)
        self.screen: torch.Tensor | None = None
        if screen:
            self.screen = _pack(weight.bfloat16(), rows_hint)
            u = BF16_ROUNDOFF
            gamma = weight.shape[1] * FP32_ROUNDOFF / (1 - weight.shape[1] * FP32_ROUNDOFF)
            relative = 1.01 * (2 * u + u * u + 3 * gamma * (1 + u) ** 2)  # 1% to spare
            self.abs_error_per_norm = relative * float(weight.norm(dim=-1).max())

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the real vocabulary for hidden states (..., hidden)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        return _packed_linear(flat, self.packed).view(*hidden.shape[:-1], self.vocab_size)

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """The fp32 argmax token of each row of `hidden` (rows, hidden)."""
        if self.screen is None:
            return row_argmax(self.logits(hidden))
        approx = _packed_linear(hidden.bfloat16(), self.screen).float().numpy()
        tokens = []
        # Per-row work runs in NumPy and Python floats: at a handful of rows, torch's per-op
        # overhead (and its CPU nonzero) would cost more than the screen saves.
        for row, (scores, norm) in enumerate(zip(approx, hidden.norm(dim=-1).tolist(),
                                                 strict=True)):
            bar = self._candidate_bar(float(scores.max()), norm)
            candidates = torch.from_numpy(np.flatnonzero(scores >= bar))
            if 0 < candidates.numel() <= MAX_CANDIDATES:
                exact = self.weight[candidates] @ hidden[row]
                tokens.append(int(candidates[int(exact.argmax())]))
            else:  # NaN or inf in the row, or too close a race: the full fp32 logits
                tokens.append(int(row_argmax(self.logits(hidden[row : row + 1]))[0]))
        return torch.tensor(tokens, dtype=torch.long)

    def _candidate_bar(self, top: float, hidden_norm: float) -> float:
        """The approximate score below which a token cannot be the fp32 argmax of its row.

        Each approximate logit a_i is within A + u|a_i| of the fp32 one, where u covers the
        final rounding of the output to bf16 and A = `abs_error_per_norm` * |x| bounds, by
        Cauchy-Schwarz, the bf16 rounding of weight and input (2u + u^2 relative per product)
        and the fp32 accumulation of three dot products (this one, the verification and any
        reference), each within K * 2^-24 relative. The best lower bound is
        T = top - A - u|top|; token i stays a candidate while a_i + A + u|a_i| >= T, a
        monotone condition on a_i, solved here for a_i.
        """
        u_out = BF16_ROUNDOFF / (1 - BF16_ROUNDOFF)
        spread = self.abs_error_per_norm * hidden_norm
        rest = top - u_out * abs(top) - 2 * spread
        return rest / (1 + u_out) if rest >= 0 else rest / (1 - u_out)
