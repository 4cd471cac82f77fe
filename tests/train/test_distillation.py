"""Distillation (`task.name=distill`): a student equal to its teacher has zero loss and zero
gradient; a smaller student's distillation loss falls; a run under tp2 x dp2 with sequence
parallelism and ZeRO-1, stopped and finished in one process, equals one uninterrupted
process; bad set-ups are one-line errors."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
from harness import assert_same_curves, spawn  # noqa: E402

from megaloom.checkpoint.reader import find_latest  # noqa: E402
from megaloom.config import (  # noqa: E402
    Config,
    ConfigError,
    DistillConfig,
    ModelConfig,
    ParallelConfig,
    TaskConfig,
    TrainConfig,
)
from megaloom.loading import open_weights  # noqa: E402
from megaloom.tasks.distill import DistillTask  # noqa: E402
from megaloom.train.metrics import read_metrics  # noqa: E402
from megaloom.train.trainer import Trainer  # noqa: E402

VOCAB, SEQ = 97, 16
DATA = [(np.random.default_rng(i).integers(0, VOCAB) + np.arange(SEQ + 1) * (1 + i % 3)) % VOCAB
        for i in range(400)]


def config(out_dir, layers, teacher=None, tp=1, pp=1, sp=False, zero=False, steps=6,
           exit_at_step=None, hard_weight=0.5, vocab=VOCAB):
    task = TaskConfig(name="distill", distill=DistillConfig(
        teacher=str(teacher), temperature=2.0, hard_weight=hard_weight)) if teacher else \
        TaskConfig()
    return Config(
        model=ModelConfig(arch="llama", num_layers=layers, hidden_size=32, num_heads=4,
                          num_kv_heads=2, ffn_hidden_size=64, vocab_size=vocab,
                          make_vocab_size_divisible_by=2, seq_len=SEQ),
        train=TrainConfig(out_dir=str(out_dir), micro_batch_size=2, global_batch_size=8,
                          max_steps=steps, exit_at_step=exit_at_step, warmup_steps=1,
                          eval_interval=3, eval_iters=2, save_interval=3, lr=3e-3),
        parallel=ParallelConfig(tp=tp, pp=pp, sequence_parallel=sp, distributed_optimizer=zero),
        task=task)


def make_student(cfg, source=None):
    task = DistillTask(cfg.model, cfg.task.distill,
                       cfg.parallel.sequence_parallel and cfg.parallel.tp > 1)
    trainer = Trainer.create(cfg, DATA, DATA[:50], source=source, task=task, adapt=task.attach)
    if find_latest(cfg.train.out_dir) is not None:
        trainer.resume(cfg.train.out_dir)
    return trainer


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    Trainer.create(config(out, layers=3), DATA, DATA[:50]).run()
    return out


def test_student_equal_to_teacher_has_zero_loss_and_gradient(teacher, tmp_path):
    cfg = config(tmp_path, layers=3, teacher=teacher, hard_weight=0.0, steps=1)
    _, _, reader = open_weights(teacher)
    trainer = make_student(cfg, source=reader)
    batches = trainer.micro_batches(0)
    loss = trainer.loss_and_gradients(batches, 1.0)
    assert abs(loss) < 1e-6
    assert trainer.clip_gradients() < 1e-5


def test_distillation_loss_falls_and_matches_its_parts(teacher, tmp_path):
    cfg = config(tmp_path, layers=1, teacher=teacher, steps=40)
    trainer = make_student(cfg)
    batch = trainer.micro_batches(0)[0]
    with torch.no_grad():
        output = trainer.model(batch["tokens"])
        teacher_logits = trainer.task.teacher(batch["tokens"])
    s, t = output[..., :VOCAB] / 2.0, teacher_logits[..., :VOCAB] / 2.0
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1) * 4.0
    ce = torch.nn.functional.cross_entropy(output[..., :VOCAB].reshape(-1, VOCAB),
                                           batch["targets"].reshape(-1), reduction="sum")
    got = trainer.task.loss_sum(output, batch, trainer.topo.tp_axis)
    torch.testing.assert_close(got, kl.sum() + 0.5 * ce, rtol=1e-5, atol=1e-5)
    trainer.run()
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert max(losses[-5:]) < 0.85 * losses[0], losses


def _parallel(rank, world, out_dir, teacher):
    make_student(config(out_dir, layers=2, teacher=teacher, tp=2, sp=True, zero=True,
                        exit_at_step=3)).run()


def test_tp2_dp2_distillation_resumed_in_one_process_equals_one_process(teacher, tmp_path):
    make_student(config(tmp_path / "single", layers=2, teacher=teacher)).run()
    spawn(_parallel, 4, str(tmp_path / "changing"), str(teacher))
    make_student(config(tmp_path / "changing", layers=2, teacher=teacher)).run()
    assert_same_curves(tmp_path / "single" / "metrics.jsonl",
                       tmp_path / "changing" / "metrics.jsonl", 6)

def test_bad_distillation_setups_are_clear_errors(teacher, tmp_path):
    with pytest.raises(ConfigError, match="task.distill.teacher.*required"):
        Config(task=TaskConfig(name="distill")).validate()
    with pytest.raises(ConfigError, match="temperature"):
        Config(task=TaskConfig(distill=DistillConfig(temperature=0.0))).validate()
    with pytest.raises(ConfigError, match="vocab_size is 97, the student's 90"):
        make_student(config(tmp_path, layers=1, teacher=teacher, vocab=90))
    spawn(_pipeline_refused, 2, str(tmp_path / "pp2"), str(teacher))


def _pipeline_refused(rank, world, out_dir, teacher):
    with pytest.raises(ConfigError, match="parallel.pp=1"):
        make_student(config(out_dir, layers=2, teacher=teacher, pp=2))
