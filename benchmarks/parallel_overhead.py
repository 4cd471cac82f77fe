"""Step time and communication volume per parallel axis for a fixed tiny GPT on gloo.

Every layout trains the same model on the same global batch; the elements each rank sends are
counted by the `Axis` collectives wrappers (ring-algorithm volumes) and the pipeline's sends,
then printed beside the closed-form volumes, per optimizer step, for global rank 0:

    TP: 8*b*s*h*(t-1)/t per layer per micro-batch (2 all-reduces forward, 2 backward)
    PP: b*s*h per stage boundary per micro-batch and direction (rank 0 sends activations
        forward only; with vpp interleaved chunks it crosses 2*vpp-1 boundaries)
    DP: 2*P*(d-1)/d for P local parameters (ring all-reduce, or reduce-scatter + all-gather)

The TP ratio is above 1 by the embedding all-reduce (and, on the last stage, the head's input
gradient and the loss's per-token scalars), which the per-layer formula leaves out.

    python -m benchmarks.parallel_overhead [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import machine_info
from megaloom.config import ModelConfig, TrainConfig
from megaloom.layout_rules import stage_layers
from megaloom.model.gpt import GPT
from megaloom.parallel.data_parallel import ParallelOptimizer
from megaloom.parallel.loss import parallel_lm_loss
from megaloom.parallel.parallelize import parallelize
from megaloom.parallel.pipeline import forward_backward
from megaloom.parallel.pipeline_interleaved import interleaved_forward_backward
from megaloom.parallel.topology import Topology

MODEL = ModelConfig(arch="gpt2", num_layers=4, hidden_size=64, num_heads=4, seq_len=64,
                    vocab_size=512, make_vocab_size_divisible_by=64)
MICRO, GLOBAL = 2, 8
LAYOUTS = [  # (tp, pp, dp, distributed optimizer, virtual pipeline stages)
    (1, 1, 1, False, 1), (2, 1, 1, False, 1), (1, 2, 1, False, 1), (1, 2, 1, False, 2),
    (1, 1, 2, False, 1), (1, 1, 2, True, 1), (2, 2, 1, False, 1), (2, 1, 2, False, 1),
    (1, 2, 2, True, 1),
]


def train_steps(topo: Topology, steps: int, zero: bool, vpp: int) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = parallelize(GPT(MODEL), topo, vpp=vpp)
    optimizer = ParallelOptimizer(model, topo, TrainConfig(), distributed=zero)
    per_rank = GLOBAL // topo.dp
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, MODEL.vocab_size, (GLOBAL, MODEL.seq_len + 1), generator=gen)
    mine = tokens[topo.dp_axis.rank * per_rank:(topo.dp_axis.rank + 1) * per_rank]
    batches = [{"tokens": mine[i:i + MICRO, :-1], "targets": mine[i:i + MICRO, 1:]}
               for i in range(0, per_rank, MICRO)]
    count = float(GLOBAL * MODEL.seq_len)

    def loss_fn(logits, batch):
        return parallel_lm_loss(logits, batch["targets"], topo.tp_axis, MODEL.vocab_size) / count

    times = []
    for step in range(steps + 1):
        if step == 1:  # the first step warms up; count the rest
            for axis in topo.axes().values():
                axis.reset_counts()
        started = time.perf_counter()
        optimizer.zero_grad()
        optimizer.start_backward(len(batches))
        if vpp > 1:
            interleaved_forward_backward(model, batches, topo, loss_fn, vpp)
        else:
            forward_backward(model, batches, topo, loss_fn)
        optimizer.finish_backward()
        optimizer.reduce_gradients()
        optimizer.clip_grad_norm(1.0)
        optimizer.step()
        times.append(time.perf_counter() - started)
    sent = {name: sum(axis.sent.values()) / steps for name, axis in topo.axes().items()}
    local_params = sum(p.numel() for p in optimizer.params)
    return times[1:], {"sent": sent, "params": local_params}


def _worker(rank: int, world: int, init_file: str, layout: tuple, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    tp, pp, _, zero, vpp = layout
    times, info = train_steps(Topology.build(tp, pp), steps, zero, vpp)
    if rank == 0:
        torch.save({"times": times, **info}, out)
    dist.destroy_process_group()


def expected(layout: tuple, params: int) -> dict[str, float]:
    tp, pp, dp, _, vpp = layout
    b, s, h = MICRO, MODEL.seq_len, MODEL.hidden_size
    micro_batches = GLOBAL // (MICRO * dp)
    layers = sum(len(stage_layers(MODEL.num_layers, pp * vpp, c * pp)) for c in range(vpp))
    return {"tp": 8 * b * s * h * (tp - 1) / tp * layers * micro_batches,
            # rank 0 sends activations forward out of each of its vpp chunks and gradients
            # backward out of each chunk but the model's first: 2 * vpp - 1 boundary crossings
            "pp": b * s * h * micro_batches * (2 * vpp - 1) if pp > 1 else 0.0,
            "dp": 2 * params * (dp - 1) / dp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    info = machine_info()
    print(f"torch {info['torch']}, gloo, {info['cores']} cores ({info['cpu']})")
    print(f"model {MODEL.num_layers}x{MODEL.hidden_size}, seq {MODEL.seq_len}, "
          f"micro-batch {MICRO}, global batch {GLOBAL}; per step, global rank 0, fp32 bytes")
    print(f"{'layout':<18}{'step ms':>9}  " + "  ".join(
        f"{axis + ' MB meas/exp':>22}{'ratio':>7}" for axis in ("tp", "pp", "dp")))
    for layout in LAYOUTS:
        tp, pp, dp, zero, vpp = layout
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.pt")
            mp.spawn(_worker, args=(tp * pp * dp, os.path.join(tmp, "rdv"), layout, args.steps,
                                    out), nprocs=tp * pp * dp)
            result = torch.load(out)
        want = expected(layout, result["params"])
        cells = []
        for axis in ("tp", "pp", "dp"):
            got, exp = result["sent"][axis] * 4 / 1e6, want[axis] * 4 / 1e6
            ratio = f"{got / exp:7.3f}" if exp else f"{'-':>7}"
            cells.append(f"{got:>10.3f} / {exp:<9.3f}{ratio}")
        name = f"tp{tp} pp{pp} dp{dp}" + (" zero" if zero else "") + (
            f" vpp{vpp}" if vpp > 1 else "")
        print(f"{name:<18}{statistics.median(result['times']) * 1e3:>9.1f}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
