"""Vocab-parallel cross-entropy: each tp rank holds a slice of the logits' vocabulary columns,
and only per-token scalars (max, sum of exps, target logit) cross ranks; full logits are never
gathered. Columns at or beyond `vocab_size` (padding) never count, as in `gpt.lm_loss`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaloom.parallel.topology import Axis


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, axis, vocab_size):
        ctx.input_dtype = logits.dtype
        local_vocab = logits.shape[-1]
        start = axis.rank * local_vocab
        columns = torch.arange(start, start + local_vocab, device=logits.device)
        wide = torch.promote_types(logits.dtype, torch.float32)
        logits = logits.to(wide).masked_fill(columns >= vocab_size, float("-inf"))
        row_max = axis.all_reduce(logits.max(dim=-1).values, op=dist.ReduceOp.MAX)
        exp = (logits - row_max[..., None]).exp()
        sum_exp = axis.all_reduce(exp.sum(dim=-1))
        local_target = targets - start
        mine = (local_target >= 0) & (local_target < local_vocab)
        index = local_target.masked_fill(~mine, 0)[..., None]
        target_logit = logits.gather(-1, index).squeeze(-1).masked_fill(~mine, 0.0)
        target_logit = axis.all_reduce(target_logit)
        ctx.save_for_backward(exp.div_(sum_exp[..., None]), index, mine)
        return sum_exp.log() + row_max - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, index, mine = ctx.saved_tensors
        grad_logits = softmax.scatter_add(-1, index, -mine[..., None].to(softmax.dtype))
        return (grad_logits * grad[..., None]).to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor, targets: torch.Tensor, axis: Axis, vocab_size: int
) -> torch.Tensor:
    """Per-token losses (float32, or the logits' dtype when wider) from this rank's slice of
    the vocabulary columns of the logits."""
    return _VocabParallelCrossEntropy.apply(local_logits, targets, axis, vocab_size)


def parallel_lm_loss(
    local_logits: torch.Tensor,
    targets: torch.Tensor,
    axis: Axis,
    vocab_size: int,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed token losses (masked), for normalising by a global token count."""
    losses = vocab_parallel_cross_entropy(local_logits, targets, axis, vocab_size)
    if loss_mask is not None:
        losses = losses * loss_mask.to(losses.dtype)
    return losses.sum()
