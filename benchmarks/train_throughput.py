"""Training throughput: megaloom vs Hugging Face `GPT2LMHeadModel`, same config, same AdamW.

Both models get the same shape (6 layers, hidden 384, 6 heads, seq 256, micro-batch 8 by
default), SDPA attention, tanh-GELU, tied embeddings and the fused `torch.optim.AdamW`;
each step is forward + backward + clip + optimizer step. Timings alternate between the two
models after warm-up, so background load hits both alike. Reports tokens/s for fp32 and bf16
autocast and the ratios megaloom/HF-fp32 and megaloom-bf16/HF-fp32.

    python -m benchmarks.train_throughput [--steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine_info, write_json
from megaloom.config import ModelConfig
from megaloom.model import GPT, lm_loss
from megaloom.train.precision import autocast_context


def build_pair(args):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = ModelConfig(arch="gpt2", num_layers=args.layers, hidden_size=args.hidden,
                      num_heads=args.heads, seq_len=args.seq, vocab_size=args.vocab,
                      make_vocab_size_divisible_by=1)
    ours = GPT(cfg)
    hf_cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.hidden,
                        n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    hf = GPT2LMHeadModel(hf_cfg)
    return ours, hf


def step_fn(model, is_hf, precision, tokens):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    device = torch.device("cpu")

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_context(precision, device):
            if is_hf:
                loss = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss
            else:
                logits = model(tokens[:, :-1])
        if not is_hf:
            loss = lm_loss(logits, tokens[:, 1:], model.config.vocab_size)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def measure(steps_by_name, warmup, steps, tokens_per_step):
    for step in steps_by_name.values():
        for _ in range(warmup):
            step()
    elapsed = dict.fromkeys(steps_by_name, 0.0)
    for _ in range(steps):
        for name, step in steps_by_name.items():
            start = time.perf_counter()
            step()
            elapsed[name] += time.perf_counter() - start
    return {name: tokens_per_step * steps / t for name, t in elapsed.items()}


def parse_arguments(doc: str) -> argparse.Namespace:
    """The model shape and timing flags both training benchmarks take."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", help="write results to this path")
    return parser.parse_args()


def report(args: argparse.Namespace, title: str, rates: dict, ratios: dict) -> None:
    """Print the machine, the shape, tokens/s and ratios; write them as JSON if asked."""
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    print(f"{title}: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, seq "
          f"{args.seq}, micro-batch {args.micro_batch}, vocab {args.vocab}; {args.steps} timed "
          "steps each")
    for name, rate in rates.items():
        print(f"  {name:<15} {rate:10.0f} tokens/s")
    for name, ratio in ratios.items():
        print(f"  ratio {name:<17} {ratio:6.2f}x")
    write_json(args.json, {"machine": info, "args": vars(args), "tokens_per_s": rates,
                           "ratios": ratios})


def main() -> None:
    args = parse_arguments(__doc__)

    torch.manual_seed(0)
    ours, hf = build_pair(args)
    tokens = torch.randint(0, args.vocab, (args.micro_batch, args.seq + 1))
    tokens_per_step = args.micro_batch * args.seq
    runs = {
        "megaloom_fp32": step_fn(ours, False, "fp32", tokens),
        "hf_fp32": step_fn(hf, True, "fp32", tokens),
        "megaloom_bf16": step_fn(ours, False, "bf16", tokens),
        "hf_bf16": step_fn(hf, True, "bf16", tokens),
    }
    rates = measure(runs, args.warmup, args.steps, tokens_per_step)
    ratios = {
        "fp32_vs_hf_fp32": rates["megaloom_fp32"] / rates["hf_fp32"],
        "bf16_vs_hf_fp32": rates["megaloom_bf16"] / rates["hf_fp32"],
        "bf16_vs_hf_bf16": rates["megaloom_bf16"] / rates["hf_bf16"],
    }
    report(args, "model", rates, ratios)


if __name__ == "__main__":
    main()
