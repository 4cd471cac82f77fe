"""Checkpoints are independent of the layout: train under tp2 pp2 (interleaved, vpp2), resume in
one process, then under tp4, then under tp2 x dp2 with the distributed optimizer; the losses
(train and validation) continue as in one uninterrupted single-process run; every rank writes
and reads only its own shards."""

import numpy as np
import torch
from harness import assert_same_curves, spawn

from megaloom.checkpoint.reader import find_latest
from megaloom.config import Config, ModelConfig, ParallelConfig, TrainConfig
from megaloom.loading import load_model
from megaloom.train.trainer import Trainer

VOCAB, SEQ = 97, 16
DATA = [(np.random.default_rng(i).integers(0, VOCAB) + np.arange(SEQ + 1) * (1 + i % 3)) % VOCAB
        for i in range(200)]


def make_trainer(out_dir, tp=1, pp=1, exit_at_step=None, vpp=1, zero=False):
    cfg = Config(
        model=ModelConfig(arch="gpt2", num_layers=4, hidden_size=32, num_heads=4,
                          vocab_size=VOCAB, make_vocab_size_divisible_by=1, seq_len=SEQ),
        train=TrainConfig(out_dir=str(out_dir), micro_batch_size=2, global_batch_size=8,
                          max_steps=8, exit_at_step=exit_at_step, warmup_steps=1,
                          eval_interval=2, eval_iters=3, save_interval=100, lr=3e-3),
        parallel=ParallelConfig(tp=tp, pp=pp, vpp=vpp, distributed_optimizer=zero),
    )
    trainer = Trainer.create(cfg, DATA, DATA[:50])
    if find_latest(out_dir) is not None:
        trainer.resume(out_dir)
    return trainer


def _run_layout(rank, world, out_dir, tp, pp, exit_at_step, vpp=1, zero=False):
    make_trainer(out_dir, tp, pp, exit_at_step, vpp, zero).run()


def test_resume_across_layouts(tmp_path):
    make_trainer(tmp_path / "straight").run()
    run = tmp_path / "changing"
    spawn(_run_layout, 4, str(run), 2, 2, 2, 2)
    assert find_latest(run).name == "step_00000002"
    make_trainer(run, exit_at_step=4).run()
    spawn(_run_layout, 4, str(run), 4, 1, 6)
    spawn(_run_layout, 4, str(run), 2, 1, None, 1, True)  # tp2 x dp2, ZeRO-1 shards
    assert_same_curves(tmp_path / "straight" / "metrics.jsonl", run / "metrics.jsonl", 8)
    final, _, _ = load_model(run)
    straight, _, _ = load_model(tmp_path / "straight")
    for (name, a), b in zip(straight.state_dict().items(), final.state_dict().values(),
                            strict=True):
        # fp32: Adam turns rounding noise in (theoretically zero) key-bias gradients into
        # updates of up to ~lr * eps-scale, so weights get an absolute tolerance.
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5, msg=name)
