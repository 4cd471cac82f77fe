"""Fine-tuning throughput and memory: SFT (packed, block-diagonal attention), SFT with LoRA
and classification against pretraining, on the same trainer, shape and batch.

Every mode runs `Trainer.train_step` (forward, backward, clip, AdamW) on rows of `seq` tokens;
SFT rows pack synthetic prompt/response samples of random lengths with `pack_rows`, so they
carry positions and an attention mask as in a real run. Timings alternate between the modes
after warm-up, so background load hits all alike. Reports tokens/s, the ratio to pretraining
(target for full SFT: within 10%) and the optimizer state each mode holds (AdamW moments).

    python -m benchmarks.finetune_throughput [--steps 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from benchmarks.common import machine_info, write_json
from megaloom.config import Config, LoraConfig, ModelConfig, TaskConfig, TrainConfig
from megaloom.finetune.lora import apply_lora
from megaloom.tasks import EpochShuffled, LanguageModelTask
from megaloom.tasks.classify import ClassifyTask
from megaloom.tasks.sft import Example, SFTTask, pack_rows
from megaloom.train.trainer import Trainer


def rows_for(mode: str, args, rng) -> list:
    vocab, seq = args.vocab, args.seq
    if mode == "pretrain":
        return [rng.integers(0, vocab, seq + 1) for _ in range(args.rows)]
    if mode == "classify":
        return [{"tokens": rng.integers(0, vocab, seq), "last": np.int64(rng.integers(8, seq)),
                 "label": np.int64(rng.integers(0, 4))} for _ in range(args.rows)]
    examples = []
    while len(examples) < args.rows * 4:
        prompt = rng.integers(0, vocab, int(rng.integers(16, seq // 2))).tolist()
        response = rng.integers(0, vocab, int(rng.integers(8, seq // 4))).tolist()
        examples.append(Example(prompt, response))
    return pack_rows(examples, seq, pack=True, pad_id=0)[:args.rows]


def build(mode: str, args, out_dir: str) -> Trainer:
    model = ModelConfig(arch=args.arch, num_layers=args.layers, hidden_size=args.hidden,
                        num_heads=args.heads, seq_len=args.seq, vocab_size=args.vocab,
                        make_vocab_size_divisible_by=1, num_labels=4 if mode == "classify" else 0)
    task_name = {"pretrain": "lm", "classify": "classify"}.get(mode, "sft")
    lora = LoraConfig(rank=args.lora_rank if mode == "sft-lora" else 0)
    config = Config(model=model, task=TaskConfig(name=task_name, lora=lora),
                    train=TrainConfig(micro_batch_size=args.batch, global_batch_size=args.batch,
                                      max_steps=10**6, out_dir=out_dir))
    task = {"pretrain": LanguageModelTask(args.vocab), "classify": ClassifyTask(4)}.get(
        mode, SFTTask(args.vocab, packed=True))
    adapt = None
    if lora.rank:
        adapt = lambda m, topo, tracker: apply_lora(m, topo, lora, 0, tracker)  # noqa: E731
    rows = rows_for(mode, args, np.random.default_rng(0))
    return Trainer.create(config, EpochShuffled(rows, 0), None, task=task, adapt=adapt)


def optimizer_bytes(trainer: Trainer) -> int:
    return sum(t.numel() * t.element_size() for state in trainer.optimizer.optimizer.state.values()
               for k, t in state.items() if k != "step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="gpt2")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    modes = ("pretrain", "sft", "sft-lora", "classify")
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {m: build(m, args, f"{tmp}/{m}") for m in modes}
        times = {m: [] for m in modes}
        for step in range(args.warmup + args.steps):
            for mode, trainer in trainers.items():
                started = time.perf_counter()
                trainer.train_step()
                if step >= args.warmup:
                    times[mode].append(time.perf_counter() - started)
    tokens = args.batch * args.seq
    result = {"machine": machine_info(), "shape": vars(args), "modes": {}}
    base = tokens / statistics.median(times["pretrain"])
    full_state = optimizer_bytes(trainers["sft"])
    print(f"{args.arch} {args.layers}x{args.hidden}, seq {args.seq}, batch {args.batch}, "
          f"fp32, {result['machine']['cpu']} ({result['machine']['cores']} cores)")
    print(f"{'mode':<10} {'tokens/s':>10} {'vs pretrain':>12} {'optimizer MB':>13} "
          f"{'vs full':>8}")
    for mode in modes:
        rate = tokens / statistics.median(times[mode])
        state = optimizer_bytes(trainers[mode])
        result["modes"][mode] = {"tokens_per_s": rate, "ratio_to_pretrain": rate / base,
                                 "optimizer_bytes": state}
        print(f"{mode:<10} {rate:>10.0f} {rate / base:>11.3f}x {state / 2**20:>13.2f} "
              f"{state / full_state:>7.4f}x")
    write_json(args.json, result)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
