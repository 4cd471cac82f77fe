"""Spawn gloo worker processes (file rendezvous in a temporary directory) and run a function on
each rank."""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        fn(rank, world, *args)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run `fn(rank, world, *args)` on `world` gloo processes; a failure on any rank fails."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_worker, args=(world, init_file, fn, args), nprocs=world,
                 join=True)


def assert_same_curves(expected_file, got_file, steps: int) -> None:
    """Two runs' `metrics.jsonl` hold steps 1..`steps` with equal losses, validation losses
    and gradient norms (fp32 reduction-order noise only)."""
    from megaloom.train.metrics import read_metrics

    expected, got = read_metrics(expected_file), read_metrics(got_file)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == list(range(1, steps + 1))
    for want, have in zip(expected, got, strict=True):
        for key in ("loss", "val_loss", "grad_norm"):
            assert (key in want) == (key in have), f"step {want['step']} {key}"
            if key in want:
                torch.testing.assert_close(
                    have[key], want[key], rtol=2e-5, atol=0,
                    msg=f"step {want['step']} {key}: {have[key]} vs {want[key]}")
