"""GPU check, one prepared script for a machine with a CUDA device (skips cleanly without one).

1. NCCL: a one-rank NCCL process group (all-reduce on the device), then megaloom's trainer on
   that group.
2. CUDA against CPU: a tiny GPT trained 6 steps in fp32 on each (TF32 off) must give the same
   losses (rtol 1e-4).
3. Throughput: the `gpt2-355m` preset (24 layers, hidden 1024, seq 1024) in bf16 on one GPU,
   random tokens: tokens/s over the steps after warm-up, MFU against the device's dense bf16
   peak (`megaloom.plan.gpus`), `torch.cuda.max_memory_allocated()` against the planner's
   bytes for the same layout (model state + activations, no allowance).

Stays well under 8 minutes on an H100/H200.

    python -m benchmarks.gpu_check [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from benchmarks.common import machine_info, write_json
from megaloom.config import Config, ModelConfig, TrainConfig
from megaloom.model.presets import preset_config
from megaloom.plan.flops import model_flops_per_token
from megaloom.plan.gpus import detect_peak_flops
from megaloom.plan.layout import Layout
from megaloom.plan.memory import stage_memory
from megaloom.plan.params import stage_parameters
from megaloom.train.trainer import Trainer


def random_samples(vocab: int, seq: int, count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, vocab, size=(count, seq + 1), dtype=np.int64))


def trainer_for(model: ModelConfig, device: str, precision: str, out_dir: str, *,
                micro: int, steps: int) -> Trainer:
    config = Config(model=model, train=TrainConfig(
        out_dir=out_dir, device=device, precision=precision, micro_batch_size=micro,
        global_batch_size=micro, max_steps=steps, warmup_steps=1, eval_interval=10**9,
        save_interval=10**9))
    return Trainer.create(config, random_samples(model.vocab_size, model.seq_len, micro * steps),
                          None)


def check_nccl() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    value = torch.ones(4, device="cuda")
    dist.all_reduce(value)
    torch.cuda.synchronize()
    print(f"nccl: backend {dist.get_backend()}, all-reduce {value.tolist()}")


def check_cuda_matches_cpu(tmp: str) -> float:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = ModelConfig(arch="llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                        seq_len=32, vocab_size=256)
    losses = {}
    for device in ("cpu", "cuda"):
        trainer = trainer_for(model, device, "fp32", f"{tmp}/{device}", micro=4, steps=6)
        losses[device] = [trainer.train_step()["loss"] for _ in range(6)]
    worst = max(abs(a - b) / abs(a) for a, b in zip(losses["cpu"], losses["cuda"], strict=True))
    print(f"cuda vs cpu: losses {[round(x, 5) for x in losses['cuda']]}, worst relative "
          f"difference {worst:.2e}")
    if worst > 1e-4:
        raise SystemExit("CUDA losses differ from the CPU losses")
    return worst


def throughput(tmp: str, steps: int, micro: int) -> dict:
    model = preset_config("gpt2-355m")
    trainer = trainer_for(model, "cuda", "bf16", f"{tmp}/355m", micro=micro, steps=steps)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        trainer.train_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    measured = times[3:]  # warm-up: kernel selection, allocator growth
    tokens_per_s = micro * model.seq_len * len(measured) / sum(measured)
    peak = detect_peak_flops(torch.device("cuda", 0), "bf16")
    flops = model_flops_per_token(model) * tokens_per_s
    layout = Layout(gpus=1, micro_batch=micro, global_batch=micro, precision="bf16")
    planned = stage_memory(model, layout.validate(model), stage_parameters(model, 1)[0], 0.0)
    result = {"parameters": sum(p.numel() for p in trainer.model.parameters()),
              "tokens_per_s": tokens_per_s, "model_tflops": flops / 1e12,
              "mfu": flops / peak if peak else None,
              "max_memory_allocated": torch.cuda.max_memory_allocated(),
              "planned_bytes": planned.total, "planned_model_state": planned.weights
              + planned.gradients + planned.optimizer}
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (unknown peak)"
    print(f"gpt2-355m bf16: {result['parameters'] / 1e6:.0f}M parameters, "
          f"{tokens_per_s:,.0f} tokens/s, {flops / 1e12:.1f} model TFLOP/s, MFU {mfu}")
    print(f"memory: max_memory_allocated {result['max_memory_allocated'] / 2**30:.2f} GiB, "
          f"planner {planned.total / 2**30:.2f} GiB (model state "
          f"{result['planned_model_state'] / 2**30:.2f} GiB; megaloom keeps fp32 weights under "
          f"autocast, the planner Megatron's 2-byte weights + fp32 master copy)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: GPU check skipped")
        return
    info = machine_info()
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    started = time.perf_counter()
    check_nccl()
    with tempfile.TemporaryDirectory() as tmp:
        worst = check_cuda_matches_cpu(tmp)
        result = throughput(tmp, args.steps, args.micro_batch)
    dist.destroy_process_group()
    print(f"done in {time.perf_counter() - started:.0f}s")
    write_json(args.json, {"machine": {**info, "gpu": torch.cuda.get_device_name(0)},
                           "cuda_vs_cpu_worst_relative": worst, **result})
    if not math.isfinite(result["tokens_per_s"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
