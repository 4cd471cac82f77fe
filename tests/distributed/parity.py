"""Reference single-process training and its parallel twin, for parity tests.

The reference is a plain loop on the unchanged model (`GPT`, or `BERT` on masked-LM
batches) with the trainer's AdamW groups
(`megaloom.train.optim`), the summed token loss over the global token count and torch's
clipping, all in float64 (the trainer's own `lm_loss` computes in float32, too coarse for tight
tolerances). The parallel loop runs the same global batches through `parallelize`, the 1F1B
pipeline and `ParallelOptimizer`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megaloom.config import ModelConfig, TrainConfig
from megaloom.model.gpt import GPT
from megaloom.model.registry import build_model
from megaloom.parallel.data_parallel import ParallelOptimizer
from megaloom.parallel.loss import parallel_lm_loss
from megaloom.parallel.parallelize import gather_full, gather_full_state_dict, parallelize
from megaloom.parallel.pipeline import forward_backward as parallel_forward_backward
from megaloom.parallel.pipeline_interleaved import interleaved_forward_backward
from megaloom.parallel.topology import Topology
from megaloom.tasks.mlm import MaskedLMTask
from megaloom.train.optim import parameter_groups

MICRO_BATCH = 2
GLOBAL_BATCH = 8
SEED = 7


def tiny_model(arch: str) -> ModelConfig:
    """4 layers, vocab 61 (odd: tp=2 needs padding), 2 kv heads for llama; `bert` is the
    post-norm encoder with the sentence-order head, `bert-pre` the pre-norm one without;
    `t5` has 4 encoder and 2 decoder layers with gated GELU and an untied head."""
    extra = {"num_kv_heads": 2, "ffn_hidden_size": 64} if arch == "llama" else {}
    if arch == "t5":
        extra = {"decoder_layers": 2, "activation": "geglu", "tie_embeddings": False,
                 "relative_buckets": 8, "relative_max_distance": 16}
    if arch.startswith("bert"):
        pre = arch == "bert-pre"
        arch, extra = "bert", {"norm_position": "pre" if pre else "post", "binary_head": not pre}
    return ModelConfig(arch=arch, num_layers=4, hidden_size=32, num_heads=4, seq_len=8,
                       vocab_size=61, make_vocab_size_divisible_by=1, **extra)


def train_config() -> TrainConfig:
    return TrainConfig(micro_batch_size=MICRO_BATCH, global_batch_size=GLOBAL_BATCH, lr=1e-2,
                       weight_decay=0.1, grad_clip=0.05, seed=SEED)


def global_batch(step: int, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Token windows (G, seq+1) and a loss mask whose token count differs per sample."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, cfg.seq_len + 1), generator=gen)
    keep = torch.rand(GLOBAL_BATCH, 1, generator=gen) * 0.9 + 0.1
    mask = (torch.rand(GLOBAL_BATCH, cfg.seq_len, generator=gen) < keep).double()
    mask[0, 0] = 1.0
    return tokens, mask


def micro_batches(step: int, cfg: ModelConfig, rows: slice | None = None
                  ) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """The micro-batches of `rows` of global batch `step` and the global loss-token count. A
    decoder predicts the next tokens; an encoder (BERT) gets token types, its targets at the
    masked positions and sentence-order labels."""
    tokens, mask = global_batch(step, cfg)
    denominator = mask.sum()
    full = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask}
    if cfg.arch == "bert":
        gen = torch.Generator().manual_seed(2000 + step)
        full["token_types"] = torch.randint(0, 2, tokens[:, :-1].shape, generator=gen)
        full["order"] = torch.randint(0, 2, (GLOBAL_BATCH,), generator=gen)
    if cfg.arch == "t5":  # a padded source; the decoder reads a shifted target of 6 tokens
        gen = torch.Generator().manual_seed(3000 + step)
        keep = torch.arange(cfg.seq_len) < torch.randint(3, cfg.seq_len + 1, (GLOBAL_BATCH, 1),
                                                         generator=gen)
        target = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, 6), generator=gen)
        full.update(attn_mask=keep, targets=target, loss_mask=mask[:, :6],
                    decoder_tokens=torch.cat([torch.zeros_like(target[:, :1]), target[:, :-1]],
                                             dim=1))
        denominator = mask[:, :6].sum()
    rows = rows or slice(0, GLOBAL_BATCH)
    mine = {k: v[rows] for k, v in full.items()}
    count = rows.stop - rows.start
    return [{k: v[i:i + MICRO_BATCH] for k, v in mine.items()}
            for i in range(0, count, MICRO_BATCH)], denominator


def reference_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: ModelConfig
                   ) -> torch.Tensor:
    """Summed float64 loss of one micro-batch on the plain model (`tasks.mlm`'s formula for
    BERT: masked-token cross-entropy plus sentence order weighted by each row's count)."""
    extra = {"token_types": batch["token_types"]} if "token_types" in batch else {}
    if "decoder_tokens" in batch:
        extra = {"decoder_tokens": batch["decoder_tokens"], "attn_mask": batch["attn_mask"]}
    output = model(batch["tokens"], **extra)
    logits, order = output if isinstance(output, tuple) else (output, None)
    losses = F.cross_entropy(logits[..., :cfg.vocab_size].reshape(-1, cfg.vocab_size),
                             batch["targets"].reshape(-1), reduction="none")
    total = (losses * batch["loss_mask"].reshape(-1)).sum()
    if order is not None:
        rows = F.cross_entropy(order, batch["order"], reduction="none")
        total = total + (rows * batch["loss_mask"].sum(dim=1)).sum()
    return total


def parallel_loss_sum(output, batch: dict[str, torch.Tensor], cfg: ModelConfig, axis
                      ) -> torch.Tensor:
    if cfg.arch == "bert":
        return MaskedLMTask(cfg.vocab_size).loss_sum(output, batch, axis)
    return parallel_lm_loss(output, batch["targets"], axis, cfg.vocab_size, batch["loss_mask"])


def fresh_model(cfg: ModelConfig) -> GPT:
    torch.manual_seed(SEED)
    return build_model(cfg).double()


def reference_run(cfg: ModelConfig, steps: int) -> list[dict]:
    """Per step: loss, grad norm, gradients (pre-clip) and post-step weights."""
    model, tcfg = fresh_model(cfg), train_config()
    optimizer = torch.optim.AdamW(parameter_groups(model, tcfg.weight_decay), lr=tcfg.lr,
                                  betas=(tcfg.adam_beta1, tcfg.adam_beta2), eps=tcfg.adam_eps)
    records = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        batches, denominator = micro_batches(step, cfg)
        loss = 0.0
        for batch in batches:
            micro = reference_loss(model, batch, cfg) / denominator
            micro.backward()
            loss += micro.item()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip).item()
        optimizer.step()
        records.append({"loss": loss, "grad_norm": norm, "grads": grads,
                        "weights": {k: v.clone() for k, v in model.state_dict().items()}})
    return records


def parallel_run(cfg: ModelConfig, topo: Topology, steps: int, sequence_parallel: bool,
                 distributed_optimizer: bool, vpp: int = 1
                 ) -> tuple[list[dict], GPT, ParallelOptimizer]:
    """The same steps on this rank's part of the layout; full tensors on rank 0 only."""
    tcfg = train_config()
    model = parallelize(fresh_model(cfg), topo, sequence_parallel, vpp=vpp)
    optimizer = ParallelOptimizer(model, topo, tcfg, distributed=distributed_optimizer,
                                  bucket_elements=2000)  # several dp buckets
    per_rank = GLOBAL_BATCH // topo.dp
    records = []
    for step in range(steps):
        optimizer.zero_grad()
        mine = slice(topo.dp_axis.rank * per_rank, (topo.dp_axis.rank + 1) * per_rank)
        batches, denominator = micro_batches(step, cfg, mine)

        def loss_fn(output, batch, denominator=denominator):
            return parallel_loss_sum(output, batch, cfg, topo.tp_axis) / denominator

        optimizer.start_backward(len(batches))
        if vpp > 1:
            total = interleaved_forward_backward(model, batches, topo, loss_fn, vpp,
                                                 sequence_parallel)
        else:
            total = parallel_forward_backward(model, batches, topo, loss_fn, sequence_parallel)
        if optimizer.buckets:  # every bucket's all-reduce was started during the backward
            assert len(optimizer.buckets.work) == len(optimizer.buckets.buckets) > 1
        optimizer.finish_backward()
        loss = topo.pp_axis.all_reduce(topo.dp_axis.all_reduce(total)).item()
        optimizer.reduce_gradients()
        grads = None
        if not distributed_optimizer:
            grads = gather_full({n: p.grad for n, p in model.named_parameters()}, model, topo)
        norm = optimizer.clip_grad_norm(tcfg.grad_clip)
        optimizer.step()
        records.append({"loss": loss, "grad_norm": norm, "grads": grads,
                        "weights": gather_full_state_dict(model, topo)})
    return records, model, optimizer


def assert_same_run(reference: list[dict], parallel: list[dict], rtol: float = 1e-9) -> None:
    for step, (ref, par) in enumerate(zip(reference, parallel, strict=True)):
        msg = f"step {step}"
        torch.testing.assert_close(par["loss"], ref["loss"], rtol=1e-9, atol=0, msg=msg)
        torch.testing.assert_close(par["grad_norm"], ref["grad_norm"], rtol=1e-9, atol=0,
                                   msg=msg)
        if par["grads"] is not None:
            for name, grad in ref["grads"].items():
                torch.testing.assert_close(par["grads"][name], grad, rtol=1e-9, atol=1e-12,
                                           msg=f"{msg} grad {name}")
        assert set(par["weights"]) == set(ref["weights"]), msg
        for name, weight in ref["weights"].items():
            torch.testing.assert_close(par["weights"][name], weight, rtol=rtol, atol=1e-9,
                                       msg=f"{msg} weight {name}")
