"""Peak memory of every rank for a ~105M-parameter GPT under several layouts, against the
single process and against `megaloom plan`.

Each run is what a user types: `megaloom train` (through torchrun for several processes) on
the embedded corpus, fp32, 2 steps and one checkpoint save, a GPT-2-flavoured model with
8 layers and hidden size 1024. Every rank records its peak resident set size
(`resource.getrusage`) when it exits. The planner columns are `megaloom plan`'s bytes for that
rank: model state (weights + gradients + AdamW moments, what `tests/plan/test_rank_memory.py`
holds equal to the real allocation) and its total with activations (no runtime allowance).
A rank that holds only its shard peaks near a 1/(tp x pp) share of the model state plus the
Python/PyTorch runtime (the `runtime` column: resident bytes once torch and megaloom are
imported, before any model exists) plus its activations. The last line puts the tp2pp2 ratio
without activations or allocator slack, runtime + planned state against the same for the
single process: the floor that no split of the model state can go below.

    python -m benchmarks.parallel_memory [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine_info, write_json

MODEL = ["model.arch=gpt2", "model.num_layers=8", "model.hidden_size=1024",
         "model.num_heads=16", "model.seq_len=128", "model.vocab_size=4096"]
TRAIN = ["train.precision=fp32", "train.max_steps=2", "train.micro_batch_size=2",
         "train.global_batch_size=4", "train.eval_interval=1000", "train.save_interval=1000",
         "train.warmup_steps=1"]
LAYOUTS = {  # name: (processes, overrides)
    "1 process": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "tp2pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "tp2pp2 dp2 + distributed optimizer": (8, ["parallel.tp=2", "parallel.pp=2",
                                              "parallel.distributed_optimizer=true"]),
}


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes (getrusage counts KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(report_dir: str, argv: list[str]) -> int:
    """Run `megaloom train ARGV` in this process, then record its peak RSS and its RSS once
    PyTorch and megaloom were imported (the runtime no layout divides)."""
    from megaloom.cli import main

    runtime = peak_rss()  # nothing has been freed yet: the peak so far is the RSS now
    code = main(["train", *argv])
    rank = int(os.environ.get("RANK", "0"))
    peak = peak_rss()
    Path(report_dir, f"rank{rank}.json").write_text(
        json.dumps({"rank": rank, "peak": peak, "runtime": runtime}))
    return code


def planner_bytes(overrides: list[str], nproc: int, rank: int) -> tuple[float, float]:
    """(model-state bytes, total bytes without allowance) `megaloom plan` predicts for `rank`."""
    from megaloom.config import load_config
    from megaloom.plan.layout import Layout
    from megaloom.plan.memory import stage_memory
    from megaloom.plan.params import stage_parameters

    config = load_config(None, MODEL + TRAIN + overrides)
    par = config.parallel
    layout = Layout(gpus=nproc, tp=par.tp, pp=par.pp, micro_batch=2, global_batch=4,
                    precision="fp32", zero=int(par.distributed_optimizer))
    pp_rank = rank // (par.tp * layout.dp)
    stage = stage_parameters(config.model, par.pp)[pp_rank]
    memory = stage_memory(config.model, layout.validate(config.model), stage, 0.0)
    state = memory.weights + memory.gradients + memory.optimizer
    return state, memory.total


def run_layout(name: str, nproc: int, overrides: list[str], cache: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [*MODEL, *TRAIN, *overrides, f"data.cache_dir={cache}", "--out",
                str(Path(tmp) / "run"), "--samples", "0"]
        script = [sys.executable, "-m", "benchmarks.parallel_memory", "--worker", tmp, "--"]
        if nproc > 1:
            script = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                      f"--nproc-per-node={nproc}", "-m", "benchmarks.parallel_memory",
                      "--worker", tmp, "--"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run([*script, *argv], check=True, env=env, stdout=subprocess.DEVNULL)
        ranks = sorted((json.loads(p.read_text()) for p in Path(tmp).glob("rank*.json")),
                       key=lambda r: r["rank"])
    for record in ranks:
        record["plan_state"], record["plan_total"] = planner_bytes(overrides, nproc,
                                                                   record["rank"])
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.exit(worker(args.worker, args.argv))
    with tempfile.TemporaryDirectory() as cache:
        # build the corpus, tokenizer and index caches once, outside the measured runs
        run_layout("warm-up", 1, ["train.max_steps=1", "model.num_layers=1",
                                  "model.hidden_size=64", "model.num_heads=4"], cache)
        results = {name: run_layout(name, nproc, overrides, cache)
                   for name, (nproc, overrides) in LAYOUTS.items()}
    single = results["1 process"][0]["peak"]
    gib = 1 << 30
    print(f"{'layout':<36} {'rank':>4} {'peak RSS':>9} {'x single':>8} {'runtime':>8} "
          f"{'plan state':>10} {'plan total':>10}")
    for name, ranks in results.items():
        for record in ranks:
            print(f"{name:<36} {record['rank']:>4} {record['peak'] / gib:8.2f}G "
                  f"{record['peak'] / single:8.2f} {record['runtime'] / gib:7.2f}G "
                  f"{record['plan_state'] / gib:9.2f}G "
                  f"{record['plan_total'] / gib:9.2f}G")
    largest = max(r["peak"] for r in results["tp2pp2"]) / single
    print(f"largest tp2pp2 rank / single process: {largest:.3f} (target <= 0.400)")
    one = results["1 process"][0]
    floor = max((r["runtime"] + r["plan_state"]) / (one["runtime"] + one["plan_state"])
                for r in results["tp2pp2"])
    print(f"the same ratio with no activations or allocator slack (runtime at import + "
          f"planned model state): {floor:.3f}")
    info = machine_info()
    print("machine:", ", ".join(f"{k}={v}" for k, v in info.items()))
    write_json(args.json, {"machine": info, "layouts": results, "tp2pp2_ratio": largest,
                           "tp2pp2_floor": floor})


if __name__ == "__main__":
    main()
