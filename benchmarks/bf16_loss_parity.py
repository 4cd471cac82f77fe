"""bf16 autocast vs fp32: loss after N steps of the tiny recipe on the embedded corpus.

Trains the same model (same seed, same data order) twice, once in fp32 and once with bf16
autocast (fp32 master weights), and prints the final validation loss of each, the mean
training loss over the last 10 steps, their relative differences and the training
throughput of both runs.

    python -m benchmarks.bf16_loss_parity [--steps 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine_info, write_json
from megaloom.config import load_config
from megaloom.train.metrics import read_metrics
from megaloom.train.run import build_trainer

RECIPE = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def train(precision: str, steps: int, out_dir: Path, cache_dir: str) -> dict:
    config = load_config(RECIPE, [
        f"train.precision={precision}", f"train.max_steps={steps}",
        f"train.eval_interval={steps}", f"train.save_interval={steps}",
        f"train.out_dir={out_dir}", f"data.cache_dir={cache_dir}",
    ])
    trainer = build_trainer(config, resume=False)
    start = time.perf_counter()
    result = trainer.run()
    seconds = time.perf_counter() - start
    losses = [r["loss"] for r in read_metrics(out_dir / "metrics.jsonl")]
    tokens = steps * config.train.global_batch_size * config.model.seq_len
    return {"val_loss": result.val_loss, "train_loss_last10": sum(losses[-10:]) / 10,
            "tokens_per_s": tokens / seconds, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--cache-dir", default=".megaloom-cache")
    parser.add_argument("--json", help="write results to this path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {p: train(p, args.steps, Path(tmp) / p, args.cache_dir) for p in ("fp32", "bf16")}
    fp32, bf16 = runs["fp32"], runs["bf16"]
    diff = {
        "val_loss_rel_diff": abs(bf16["val_loss"] - fp32["val_loss"]) / fp32["val_loss"],
        "train_loss_rel_diff": abs(bf16["train_loss_last10"] - fp32["train_loss_last10"])
        / fp32["train_loss_last10"],
        "bf16_speedup": bf16["tokens_per_s"] / fp32["tokens_per_s"],
    }
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}")
    print(f"recipe: {RECIPE.name}, {args.steps} steps, default corpus")
    for name, run in runs.items():
        print(f"  {name}: val loss {run['val_loss']:.4f}, last-10 train loss "
              f"{run['train_loss_last10']:.4f}, {run['tokens_per_s']:.0f} tokens/s")
    print(f"  relative difference: val {diff['val_loss_rel_diff']:.2%}, "
          f"train {diff['train_loss_rel_diff']:.2%}; bf16 speed-up {diff['bf16_speedup']:.2f}x")
    write_json(args.json, {"machine": info, "steps": args.steps, "runs": runs, **diff})


if __name__ == "__main__":
    main()
