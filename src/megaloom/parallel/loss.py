"""Vocab-parallel cross-entropy and distillation KL: each tp rank holds a slice of the logits'
vocabulary columns, and only per-token scalars (max, sum of exps, target logit) cross ranks;
full logits are never gathered. Columns at or beyond `vocab_size` (padding) never count, as in
`gpt.lm_loss`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaloom.parallel.topology import Axis


def _log_softmax_parts(logits: torch.Tensor, axis: Axis, vocab_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(this slice's softmax, the global log-sum-exp per token) of vocab-sharded `logits`
    (float32 or wider), padding columns excluded."""
    local_vocab = logits.shape[-1]
    start = axis.rank * local_vocab
    columns = torch.arange(start, start + local_vocab, device=logits.device)
    logits = logits.masked_fill(columns >= vocab_size, float("-inf"))
    row_max = axis.all_reduce(logits.max(dim=-1).values, op=dist.ReduceOp.MAX)
    exp = (logits - row_max[..., None]).exp()
    sum_exp = axis.all_reduce(exp.sum(dim=-1))
    return exp.div_(sum_exp[..., None]), sum_exp.log() + row_max


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, axis, vocab_size):
        ctx.input_dtype = logits.dtype
        local_vocab = logits.shape[-1]
        start = axis.rank * local_vocab
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        softmax, log_sum_exp = _log_softmax_parts(logits, axis, vocab_size)
        local_target = targets - start
        mine = (local_target >= 0) & (local_target < local_vocab)
        index = local_target.masked_fill(~mine, 0)[..., None]
        target_logit = logits.gather(-1, index).squeeze(-1).masked_fill(~mine, 0.0)
        target_logit = axis.all_reduce(target_logit)
        ctx.save_for_backward(softmax, index, mine)
        return log_sum_exp - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, index, mine = ctx.saved_tensors
        grad_logits = softmax.scatter_add(-1, index, -mine[..., None].to(softmax.dtype))
        return (grad_logits * grad[..., None]).to(ctx.input_dtype), None, None, None


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, axis, vocab_size, temperature):
        ctx.input_dtype, ctx.temperature = student.dtype, temperature
        wide = torch.promote_types(student.dtype, torch.float32)
        s = student.to(wide) / temperature
        t = teacher.to(wide) / temperature
        q, lse_s = _log_softmax_parts(s, axis, vocab_size)
        p, lse_t = _log_softmax_parts(t, axis, vocab_size)
        # KL(p || q) = sum_v p_v (t_v - s_v) - lse_t + lse_s; p is 0 on padding columns
        cross = axis.all_reduce((p * (t - s)).sum(dim=-1))
        ctx.save_for_backward(q.sub_(p))
        return temperature**2 * (cross - lse_t + lse_s)

    @staticmethod
    def backward(ctx, grad):
        (q_minus_p,) = ctx.saved_tensors  # d(T^2 KL)/d(student logits) = T (q - p)
        return ((q_minus_p * (ctx.temperature * grad[..., None])).to(ctx.input_dtype),
                None, None, None, None)


def vocab_parallel_kl(student: torch.Tensor, teacher: torch.Tensor, axis: Axis,
                      vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """Per-token `temperature`^2 x KL(softmax(teacher / T) || softmax(student / T)) from this
    rank's slices of both models' logits; gradients flow to the student only."""
    return _VocabParallelKL.apply(student, teacher.detach(), axis, vocab_size, temperature)


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
