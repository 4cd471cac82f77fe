"""Gradual pruning is the same on every layout: a run pruned under tp2 x pp2, resumed under
tp2 x dp2 with ZeRO-1 and finished in one process has the losses, sparsity figures and masks
of one uninterrupted single-process run (masks restored from the sharded checkpoint)."""

import numpy as np
import pytest
import torch
from harness import spawn

from megaloom.checkpoint.reader import find_latest, open_checkpoint
from megaloom.config import Config, ModelConfig, ParallelConfig, PruningConfig, TrainConfig
from megaloom.train.metrics import read_metrics
from megaloom.train.trainer import Trainer

VOCAB, SEQ = 97, 16
DATA = [(np.random.default_rng(i).integers(0, VOCAB) + np.arange(SEQ + 1) * (1 + i % 3)) % VOCAB
        for i in range(200)]
PRUNING = PruningConfig(sparsity=0.6, initial_sparsity=0.1, start_step=1, end_step=7,
                        interval=2, targets=["qkv", "proj", "up", "down", "embed"])


def make_trainer(out_dir, tp=1, pp=1, exit_at_step=None, zero=False):
    cfg = Config(
        model=ModelConfig(arch="gpt2", num_layers=4, hidden_size=32, num_heads=4,
                          vocab_size=VOCAB, make_vocab_size_divisible_by=1, seq_len=SEQ),
        train=TrainConfig(out_dir=str(out_dir), micro_batch_size=2, global_batch_size=8,
                          max_steps=8, exit_at_step=exit_at_step, warmup_steps=1,
                          eval_interval=4, eval_iters=3, save_interval=4, keep_last=3, lr=3e-3,
                          pruning=PRUNING),
        parallel=ParallelConfig(tp=tp, pp=pp, distributed_optimizer=zero),
    )
    trainer = Trainer.create(cfg, DATA, DATA[:50])
    if find_latest(out_dir) is not None:
        trainer.resume(out_dir)
    return trainer


def _run_layout(rank, world, out_dir, tp, pp, exit_at_step, zero=False):
    make_trainer(out_dir, tp, pp, exit_at_step, zero).run()


def masks(step_dir) -> dict:
    checkpoint = open_checkpoint(step_dir)
    return {key: checkpoint.store.read(key) for key in sorted(checkpoint.store.shapes)
            if key.startswith("mask/")}


def test_pruned_run_is_the_same_on_every_layout(tmp_path):
    make_trainer(tmp_path / "straight").run()
    run = tmp_path / "changing"
    spawn(_run_layout, 4, str(run), 2, 2, 4)
    spawn(_run_layout, 4, str(run), 2, 1, 6, True)  # tp2 x dp2, ZeRO-1
    make_trainer(run).run()
    expected = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    got = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 9))
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have["loss"], want["loss"], rtol=2e-5, atol=0)
        assert have["sparsity"] == want["sparsity"] and have["sparsity_target"] == \
            want["sparsity_target"]
        assert have["sparsity_layers"] == want["sparsity_layers"]
    assert [r["sparsity_target"] for r in expected] == pytest.approx(
        [0.1, 0.1, 0.6 - 0.5 * (1 - 2 / 6) ** 3, 0.6 - 0.5 * (1 - 2 / 6) ** 3,
         0.6 - 0.5 * (1 - 4 / 6) ** 3, 0.6 - 0.5 * (1 - 4 / 6) ** 3, 0.6, 0.6])
    for step in ("step_00000004", "step_00000008"):
        want = masks(tmp_path / "straight" / "checkpoints" / step)
        have = masks(run / "checkpoints" / step)
        assert sorted(want) == sorted(have) and "mask/embed.weight" in want
        for key in want:
            assert torch.equal(have[key], want[key]), f"{step} {key}"
