"""BERT training throughput: megaloom's `BERT` vs Hugging Face `BertForMaskedLM`, same shape.

Both get the same post-norm shape (6 layers, hidden 384, 6 heads, seq 256, micro-batch 8 by
default), SDPA attention, erf-GELU, tied embeddings, the same 15% masked positions and token
types, and the fused `torch.optim.AdamW`; each step is forward + masked-LM loss + backward +
clip + optimizer step. Timings alternate between the models after warm-up (`train_throughput`'s
`measure`). Reports tokens/s for fp32 and bf16 autocast and the ratios against HF.

    python -m benchmarks.bert_train_throughput [--steps 8] [--json out.json]
"""

from __future__ import annotations

import torch

from benchmarks.train_throughput import measure, parse_arguments, report
from megaloom.config import ModelConfig
from megaloom.data.masking import IGNORE
from megaloom.model.bert import BERT
from megaloom.model.gpt import lm_loss
from megaloom.train.precision import autocast_context


def build_pair(args):
    from transformers import BertConfig, BertForMaskedLM

    cfg = ModelConfig(arch="bert", num_layers=args.layers, hidden_size=args.hidden,
                      num_heads=args.heads, seq_len=args.seq, vocab_size=args.vocab,
                      make_vocab_size_divisible_by=1)
    hf_cfg = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=args.heads,
                        intermediate_size=4 * args.hidden, max_position_embeddings=args.seq,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        layer_norm_eps=cfg.norm_eps, attn_implementation="sdpa")
    return BERT(cfg), BertForMaskedLM(hf_cfg)


def step_fn(model, is_hf, precision, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    tokens, types, labels = batch
    mask = labels != IGNORE

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_context(precision, torch.device("cpu")):
            if is_hf:
                loss = model(input_ids=tokens, token_type_ids=types, labels=labels).loss
            else:
                logits = model(tokens, token_types=types)
        if not is_hf:
            loss = lm_loss(logits, labels.clamp(min=0), model.config.vocab_size, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def main() -> None:
    args = parse_arguments(__doc__)

    torch.manual_seed(0)
    ours, hf = build_pair(args)
    shape = (args.micro_batch, args.seq)
    tokens = torch.randint(0, args.vocab, shape)
    types = (torch.arange(args.seq) >= args.seq // 2).long().expand(shape)
    labels = torch.where(torch.rand(shape) < 0.15, tokens, IGNORE)
    batch = (tokens, types, labels)
    runs = {
        "megaloom_fp32": step_fn(ours, False, "fp32", batch),
        "hf_fp32": step_fn(hf, True, "fp32", batch),
        "megaloom_bf16": step_fn(ours, False, "bf16", batch),
        "hf_bf16": step_fn(hf, True, "bf16", batch),
    }
    rates = measure(runs, args.warmup, args.steps, args.micro_batch * args.seq)
    ratios = {"fp32_vs_hf_fp32": rates["megaloom_fp32"] / rates["hf_fp32"],
              "bf16_vs_hf_bf16": rates["megaloom_bf16"] / rates["hf_bf16"]}
    report(args, "BERT masked-LM", rates, ratios)

if __name__ == "__main__":
    main()
